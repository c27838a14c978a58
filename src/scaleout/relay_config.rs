//! The callback relay's routing config as the fleet sees it: each instance publishes a
//! fingerprint of what its routes mean (acquirer names, path prefix, targets and the
//! branches they serve) and compares it with the other live instances', so a fleet whose
//! instances disagree is seen (`diia_gateway_relay_config_mismatch`, a warning) before a
//! callback is delivered to a target of the same name that serves other branches.
//!
//! Nothing in clear: the fingerprint is an HMAC-SHA256 (truncated to 16 bytes) of the
//! config's canonical bytes under an HKDF subkey of the fleet secret, so Redis learns only
//! whether two instances agree. Each entry is `instance.fingerprint.stamp.mac` in the
//! sorted set `{dg}:relay-config` (scored by Redis's clock), signed under a subkey of its
//! own: a Redis writer can drop entries or replay old ones for `instance_ttl` at most,
//! never forge a fingerprint. It is refreshed on each heartbeat interval by the same
//! script as the fleet set (members older than `instance_ttl` are dropped), within the
//! documented ACL.
//!
//! A mismatch is reported, never refused: during a rolling config change instances
//! legitimately disagree for a while.

use std::sync::Arc;

use ring::hmac;
use tokio::task::JoinHandle;

use super::Scaleout;
use super::secret::{FleetSecret, Members};

/// The sorted set of relay config entries (the `{dg}` hash tag and `~{dg}:*` cover it).
pub const CONFIG_KEY: &str = "{dg}:relay-config";
/// Bytes of the fingerprint's MAC.
const FINGERPRINT_LEN: usize = 16;

/// A routing config's fingerprint under the fleet secret: equal on two instances exactly
/// when their configs' canonical bytes are (and their fleet secrets). Shows nothing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ConfigFingerprint([u8; FINGERPRINT_LEN]);

impl std::fmt::Debug for ConfigFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConfigFingerprint(<redacted>)")
    }
}

/// What one comparison found among the other live instances that publish a relay config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigAgreement {
    /// Other live instances with a readable entry.
    pub peers: usize,
    /// How many of them publish another fingerprint.
    pub differing: usize,
}

impl ConfigAgreement {
    /// Whether any live peer's routing config differs from this instance's.
    #[must_use]
    pub fn mismatch(self) -> bool {
        self.differing > 0
    }
}

/// The keys of this feature: the fingerprint's MAC and the entries' signatures.
pub(super) struct ConfigKeys {
    fingerprint: hmac::Key,
    entries: Members,
    /// This instance's entry as last written (removed on the next write and on leave).
    entry: std::sync::Mutex<Option<String>>,
}

impl ConfigKeys {
    pub(super) fn new(secret: &FleetSecret) -> Self {
        let key: [u8; 32] = secret.subkey("relay config");
        Self {
            fingerprint: hmac::Key::new(hmac::HMAC_SHA256, &key),
            entries: secret.relay_config_members(),
            entry: std::sync::Mutex::new(None),
        }
    }

    fn last_entry(&self) -> String {
        self.entry
            .lock()
            .map(|entry| entry.clone().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Scaleout {
    /// The fingerprint of a relay routing config given as canonical bytes
    /// (`RelaySettings::routing_config`).
    #[must_use]
    pub fn relay_config_fingerprint(&self, canonical: &[u8]) -> ConfigFingerprint {
        let tag = hmac::sign(&self.relay_config.fingerprint, canonical);
        let mut out = [0u8; FINGERPRINT_LEN];
        if let Some(mac) = tag.as_ref().get(..FINGERPRINT_LEN) {
            out.copy_from_slice(mac);
        }
        ConfigFingerprint(out)
    }

    /// Publishes this instance's fingerprint (replacing its previous entry) and compares it
    /// with the other live instances' (one script); `None` when Redis is down or did not
    /// answer in time. Entries that are not signed under the fleet secret, or older than
    /// `instance_ttl` on Redis's clock, do not count.
    pub async fn compare_relay_config(
        &self,
        fingerprint: ConfigFingerprint,
    ) -> Option<ConfigAgreement> {
        let ttl = u64::try_from(self.instance_ttl.as_millis()).unwrap_or(u64::MAX);
        let own = format!("{}.{}", self.instance, hex::encode(fingerprint.0));
        let entry = self.relay_config.entries.sign(&own, self.redis_now_ms());
        let previous = self.relay_config.last_entry();
        let (now, entries) = self
            .publish_entry("relay_config", CONFIG_KEY, entry.clone(), previous, ttl)
            .await?;
        if let Ok(mut last) = self.relay_config.entry.lock() {
            *last = Some(entry);
        }
        // The newest readable entry of each other instance.
        let mut newest: std::collections::HashMap<&[u8], (u64, &[u8])> =
            std::collections::HashMap::new();
        for entry in &entries {
            let Some((signed, stamp)) = self.relay_config.entries.open(entry) else {
                continue;
            };
            if stamp.saturating_add(ttl) < now || stamp > now.saturating_add(ttl) {
                continue;
            }
            let Some(dot) = signed.iter().rposition(|b| *b == b'.') else {
                continue;
            };
            let (instance, theirs) = (&signed[..dot], &signed[dot + 1..]);
            if instance == self.instance.as_bytes() {
                continue;
            }
            let slot = newest.entry(instance).or_insert((stamp, theirs));
            if stamp >= slot.0 {
                *slot = (stamp, theirs);
            }
        }
        let ours = hex::encode(fingerprint.0);
        let differing = newest
            .values()
            .filter(|(_, theirs)| *theirs != ours.as_bytes())
            .count();
        Some(ConfigAgreement {
            peers: newest.len(),
            differing,
        })
    }

    /// Removes this instance's entry (on shutdown), so the others stop comparing with it.
    pub async fn withdraw_relay_config(&self) {
        let entry = self.relay_config.last_entry();
        if entry.is_empty() {
            return;
        }
        let _ = self
            .link
            .run("relay_config", |mut c| async move {
                redis::cmd("ZREM")
                    .arg(CONFIG_KEY)
                    .arg(entry)
                    .query_async::<i64>(&mut c)
                    .await
            })
            .await;
    }

    /// The period entries are refreshed at (`scaleout.heartbeat_interval`).
    #[must_use]
    pub fn heartbeat_interval(&self) -> std::time::Duration {
        self.heartbeat_interval
    }
}

/// Publishes and compares `fingerprint` at once and then every heartbeat interval until
/// `shutdown` (then withdraws it). `report` gets each comparison's outcome (not called
/// while Redis does not answer: the last outcome stands). A change between agreement and
/// mismatch is logged, with counts only (never a config value or fingerprint).
pub fn watch_relay_config(
    fleet: Arc<Scaleout>,
    fingerprint: ConfigFingerprint,
    shutdown: impl Future<Output = ()> + Send + 'static,
    report: impl Fn(ConfigAgreement) + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut beats = tokio::time::interval(fleet.heartbeat_interval());
        beats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = std::pin::pin!(shutdown);
        let mut mismatch = false;
        loop {
            tokio::select! {
                () = &mut shutdown => {
                    fleet.withdraw_relay_config().await;
                    return;
                }
                _ = beats.tick() => {}
            }
            let Some(agreement) = fleet.compare_relay_config(fingerprint).await else {
                continue;
            };
            if agreement.mismatch() && !mismatch {
                tracing::warn!(
                    differing = agreement.differing,
                    peers = agreement.peers,
                    "relay: the callback relay's routing config (acquirer names, path_prefix, targets and their branch_ids) differs from other fleet instances'; a callback may be delivered to a target that does not serve its branch"
                );
            } else if !agreement.mismatch() && mismatch {
                tracing::info!(
                    peers = agreement.peers,
                    "relay: the callback relay's routing config agrees across the fleet again"
                );
            }
            mismatch = agreement.mismatch();
            report(agreement);
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn entries_and_members_are_signed_under_different_keys() {
        let secret = FleetSecret::parse(
            "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
            "1",
        )
        .unwrap();
        let entry = secret
            .relay_config_members()
            .sign("00ff.abcd", 1_700_000_000_000);
        assert!(secret.members().open(entry.as_bytes()).is_none());
        let member = secret.members().sign("00ff", 1_700_000_000_000);
        assert!(
            secret
                .relay_config_members()
                .open(member.as_bytes())
                .is_none()
        );
        assert_eq!(
            secret.relay_config_members().open(entry.as_bytes()),
            Some((&b"00ff.abcd"[..], 1_700_000_000_000))
        );
    }
}
