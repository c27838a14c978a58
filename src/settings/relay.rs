//! `[callback_relay]`: its files read (seal keys, path tokens, recipient certificates,
//! signing secrets) and its values checked into [`RelaySettings`]. Every refusal names the
//! key (and the acquirer or target) and the fix.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

use super::{ConfigError, invalid};
use crate::config::{
    CallbackRelayConfig, FileConfig, FsyncMode, RelayAcquirerConfig, RelayTargetConfig,
};
use crate::relay::settings::{Branches, RelayAcquirer, RelaySettings, Target};
use crate::relay::{Fsync, Keyring, Retention, settings::Recipient};

/// The checked relay, or `None` when `[callback_relay]` is absent or off.
pub(super) fn relay(file: &FileConfig) -> Result<Option<Arc<RelaySettings>>, ConfigError> {
    let relay = &file.callback_relay;
    if !relay.enabled {
        return Ok(None);
    }
    check_values(relay, file)?;
    let keys = seal_keys(relay)?;
    let targets = relay
        .target
        .iter()
        .map(target)
        .collect::<Result<Vec<_>, _>>()?;
    unique(
        targets.iter().map(|t| t.name.as_str()),
        "callback_relay.target.name",
    )?;
    let acquirers = relay
        .acquirer
        .iter()
        .map(|a| acquirer(a, &targets))
        .collect::<Result<Vec<_>, _>>()?;
    if acquirers.is_empty() {
        return Err(invalid(
            "callback_relay.acquirer",
            "list at least one [[callback_relay.acquirer]] (its path token and certificate)",
        ));
    }
    unique(
        acquirers.iter().map(|a| a.name.as_str()),
        "callback_relay.acquirer.name",
    )?;
    let tokens: HashSet<[u8; 32]> = acquirers.iter().map(|a| a.path_token).collect();
    if tokens.len() != acquirers.len() {
        return Err(invalid(
            "callback_relay.acquirer.path_token_file",
            "two acquirers share a path token: give each its own (openssl rand -hex 32)",
        ));
    }
    Ok(Some(Arc::new(RelaySettings {
        listen: relay.listen,
        tls: tls(file)?,
        path_prefix: relay.path_prefix.clone(),
        max_body: relay.max_body,
        max_in_flight_bytes: relay.max_in_flight_bytes,
        data_dir: relay.data_dir.clone(),
        fsync: match relay.fsync {
            FsyncMode::Always => Fsync::Always,
            FsyncMode::Batch => Fsync::Batch,
        },
        max_db_bytes: (relay.max_db_bytes > 0).then_some(relay.max_db_bytes),
        keys: Arc::new(keys),
        route_ttl: relay.route_ttl,
        retry_schedule: retry_schedule(&relay.retry_schedule)?,
        max_age: relay.max_age,
        delivery_timeout: relay.delivery_timeout,
        per_target_concurrency: relay.per_target_concurrency,
        retention: Retention {
            tombstone_ttl: relay.tombstone_ttl,
            dead_retention: relay.dead_retention,
            orphan_retention: relay.orphan_retention,
        },
        acquirers,
        targets,
    })))
}

/// The plain values: listener, path, sizes, times.
fn check_values(relay: &CallbackRelayConfig, file: &FileConfig) -> Result<(), ConfigError> {
    // Port 0 (tests) picks a free port per listener.
    let taken = [file.server.listen, file.server.admin_listen];
    if relay.listen.port() != 0 && taken.contains(&relay.listen) {
        return Err(invalid(
            "callback_relay.listen",
            "must differ from server.listen and server.admin_listen: the relay has its own listener",
        ));
    }
    let prefix = &relay.path_prefix;
    if !prefix.starts_with('/')
        || prefix.ends_with('/')
        || prefix.contains("//")
        || !prefix
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#')
    {
        return Err(invalid(
            "callback_relay.path_prefix",
            "must be an absolute path without a trailing slash, query or fragment (e.g. /diia/callback)",
        ));
    }
    if relay.max_body == 0 {
        return Err(invalid("callback_relay.max_body", "must be above 0"));
    }
    if relay.max_in_flight_bytes < relay.max_body {
        return Err(invalid(
            "callback_relay.max_in_flight_bytes",
            "must be at least callback_relay.max_body: one callback must fit",
        ));
    }
    let positive = [
        ("callback_relay.route_ttl", relay.route_ttl),
        ("callback_relay.max_age", relay.max_age),
        ("callback_relay.delivery_timeout", relay.delivery_timeout),
        ("callback_relay.tombstone_ttl", relay.tombstone_ttl),
        ("callback_relay.dead_retention", relay.dead_retention),
        ("callback_relay.orphan_retention", relay.orphan_retention),
    ];
    if let Some((key, _)) = positive.iter().find(|(_, d)| d.is_zero()) {
        return Err(invalid(key, "must be above 0"));
    }
    if relay.per_target_concurrency == 0 {
        return Err(invalid(
            "callback_relay.per_target_concurrency",
            "must be above 0",
        ));
    }
    Ok(())
}

/// `[server.tls]`'s certificate and key for the relay's listener, with no client
/// verification: `server.tls.client_ca` is for branches, and Diia presents no certificate.
fn tls(file: &FileConfig) -> Result<Option<tokio_rustls::TlsAcceptor>, ConfigError> {
    let Some(tls) = &file.server.tls else {
        return Ok(None);
    };
    let config = crate::tls::server_config(&tls.cert, &tls.key, None, &[])
        .map_err(|problem| invalid("server.tls", problem))?;
    Ok(Some(tokio_rustls::TlsAcceptor::from(config)))
}

fn read(key: &'static str, owner: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|e| invalid(key, format!("{owner}cannot read {}: {e}", path.display())))
}

fn seal_keys(relay: &CallbackRelayConfig) -> Result<Keyring, ConfigError> {
    const KEY: &str = "callback_relay.seal_key_file";
    let Some(path) = &relay.seal_key_file else {
        return Err(invalid(
            KEY,
            "required when the relay is enabled: a file of `id = <64 hex digits>` lines, newest first",
        ));
    };
    let text = String::from_utf8(read(KEY, "", path)?)
        .map_err(|_| invalid(KEY, format!("{} is not UTF-8 text", path.display())))?;
    Keyring::parse(&text).map_err(|e| invalid(KEY, format!("{}: {e}", path.display())))
}

/// `retry_schedule`: durations above 0, at least one.
fn retry_schedule(written: &[String]) -> Result<Vec<Duration>, ConfigError> {
    const KEY: &str = "callback_relay.retry_schedule";
    if written.is_empty() {
        return Err(invalid(
            KEY,
            "list at least one pause, e.g. [\"1s\", \"5s\", \"30s\"]",
        ));
    }
    written
        .iter()
        .map(|text| match humantime::parse_duration(text) {
            Ok(d) if !d.is_zero() => Ok(d),
            Ok(_) => Err(invalid(KEY, format!("{text:?}: a pause must be above 0"))),
            Err(e) => Err(invalid(
                KEY,
                format!("{text:?}: {e} (write e.g. \"30s\", \"2m\")"),
            )),
        })
        .collect()
}

fn unique<'a>(names: impl Iterator<Item = &'a str>, key: &'static str) -> Result<(), ConfigError> {
    let mut seen = HashSet::new();
    for name in names {
        if name.is_empty() {
            return Err(invalid(key, "must not be empty"));
        }
        if !seen.insert(name) {
            return Err(invalid(key, format!("{name:?} is listed twice")));
        }
    }
    Ok(())
}

fn acquirer(
    config: &RelayAcquirerConfig,
    targets: &[Arc<Target>],
) -> Result<Arc<RelayAcquirer>, ConfigError> {
    let owner = format!("acquirer {:?}: ", config.name);
    if let Some(name) = &config.default_target
        && !targets.iter().any(|t| &t.name == name)
    {
        return Err(invalid(
            "callback_relay.acquirer.default_target",
            format!("{owner}names no [[callback_relay.target]] ({name:?})"),
        ));
    }
    const TOKEN: &str = "callback_relay.acquirer.path_token_file";
    let text = read(TOKEN, &owner, &config.path_token_file)?;
    let path_token =
        path_token(&text).map_err(|problem| invalid(TOKEN, format!("{owner}{problem}")))?;
    const CERT: &str = "callback_relay.acquirer.recipient_cert_file";
    let pem = read(CERT, &owner, &config.recipient_cert_file)?;
    let recipient =
        recipient(&pem).map_err(|problem| invalid(CERT, format!("{owner}{problem}")))?;
    Ok(Arc::new(RelayAcquirer {
        name: config.name.clone(),
        path_token,
        recipient,
        default_target: config.default_target.clone(),
    }))
}

/// A path token: 32 random bytes as 64 hex digits or 43 base64url characters.
fn path_token(file: &[u8]) -> Result<[u8; 32], String> {
    let text = std::str::from_utf8(file).unwrap_or_default().trim();
    let mut token = [0u8; 32];
    let ok = match text.len() {
        64 => hex::decode_to_slice(text, &mut token).is_ok(),
        43 => URL_SAFE_NO_PAD
            .decode(text)
            .ok()
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .map(|bytes| token = bytes)
            .is_some(),
        _ => false,
    };
    if !ok {
        return Err(
            "must hold 32 random bytes as 64 hex digits or 43 base64url characters \
             (openssl rand -hex 32)"
                .to_owned(),
        );
    }
    if token.iter().all(|b| *b == token[0]) {
        return Err("holds a placeholder (all bytes equal), not a random token".to_owned());
    }
    Ok(token)
}

/// The issuer and serial of a PEM certificate: whom a CMS recipient must name.
fn recipient(pem: &[u8]) -> Result<Recipient, String> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem).map_err(|e| format!("not a PEM certificate: {e}"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    Ok(Recipient {
        issuer_der: cert.tbs_certificate.issuer.as_raw().to_vec(),
        serial: cert.tbs_certificate.raw_serial().to_vec(),
    })
}

fn target(config: &RelayTargetConfig) -> Result<Arc<Target>, ConfigError> {
    let owner = format!("target {:?}: ", config.name);
    let url: http::Uri = config
        .url
        .parse()
        .map_err(|e| invalid("callback_relay.target.url", format!("{owner}{e}")))?;
    if !matches!(url.scheme_str(), Some("http" | "https")) || url.host().is_none() {
        return Err(invalid(
            "callback_relay.target.url",
            format!("{owner}must be an http:// or https:// URL"),
        ));
    }
    const SECRET: &str = "callback_relay.target.signing_secret_file";
    let text = read(SECRET, &owner, &config.signing_secret_file)?;
    let signing_secret = std::str::from_utf8(&text)
        .ok()
        .map(str::trim)
        .and_then(|t| t.strip_prefix("whsec_"))
        .and_then(|b64| STANDARD.decode(b64).ok())
        .filter(|secret| secret.len() >= 16)
        .ok_or_else(|| {
            invalid(
                SECRET,
                format!("{owner}must hold `whsec_` and at least 16 bytes in base64"),
            )
        })?;
    let branches = match config.branch_ids.as_slice() {
        [] => {
            return Err(invalid(
                "callback_relay.target.branch_ids",
                format!("{owner}list the branch ids it serves, or [\"*\"]"),
            ));
        }
        [all] if all == "*" => Branches::All,
        ids => Branches::Listed(ids.to_vec()),
    };
    Ok(Arc::new(Target {
        name: config.name.clone(),
        url,
        signing_secret,
        branches,
    }))
}

#[cfg(test)]
mod tests {
    use super::super::Settings;

    struct Files(tempfile::TempDir);

    impl Files {
        fn new() -> Self {
            let dir = tempfile::TempDir::new().expect("temp dir");
            let cert = rcgen::generate_simple_self_signed(vec!["a.test".into()]).expect("cert");
            let write = |name: &str, text: &str| {
                std::fs::write(dir.path().join(name), text).expect("write");
            };
            write("cert.pem", &cert.cert.pem());
            write("keys", &format!("k1 = {}\n", "0123456789abcdef".repeat(4)));
            write("token", &"f1e2d3c4b5a69788".repeat(4));
            write("whsec", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
            Self(dir)
        }

        fn path(&self, name: &str) -> String {
            self.0.path().join(name).display().to_string()
        }

        /// A valid relay section, with `extra` lines appended to `[callback_relay]`.
        fn config(&self, extra: &str) -> String {
            format!(
                "[callback_relay]\nenabled = true\nseal_key_file = {:?}\n{extra}\n\
                 [[callback_relay.acquirer]]\nname = \"a1\"\npath_token_file = {:?}\n\
                 recipient_cert_file = {:?}\ndefault_target = \"t1\"\n\
                 [[callback_relay.target]]\nname = \"t1\"\nurl = \"https://b.example/cb\"\n\
                 signing_secret_file = {:?}\nbranch_ids = [\"*\"]\n",
                self.path("keys"),
                self.path("token"),
                self.path("cert.pem"),
                self.path("whsec"),
            )
        }
    }

    fn problem(text: &str) -> String {
        match Settings::from_toml(text) {
            Ok(_) => panic!("config must be refused: {text}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn off_by_default_and_a_valid_section_builds() {
        assert!(Settings::from_toml("").expect("valid").relay.is_none());
        let files = Files::new();
        let settings = Settings::from_toml(&files.config("")).expect("valid");
        let relay = settings.relay.expect("relay on");
        assert_eq!(relay.path_prefix, "/diia/callback");
        assert_eq!(relay.max_body, 16 * 1024 * 1024);
        assert_eq!(relay.retry_schedule.len(), 5);
        assert_eq!(relay.acquirers[0].path_token[0], 0xf1);
        assert!(!relay.acquirers[0].recipient.serial.is_empty());
        assert!(relay.targets[0].branches.serves("any"));
        assert!(
            settings
                .cold
                .changed_keys(&Settings::from_toml("").expect("valid").cold)
                .contains(&"callback_relay")
        );
    }

    #[test]
    fn every_bad_value_names_its_key() {
        let files = Files::new();
        let cases = [
            (
                "retry_schedule = [\"1s\", \"soon\"]",
                "callback_relay.retry_schedule:",
            ),
            ("retry_schedule = []", "callback_relay.retry_schedule:"),
            ("path_prefix = \"diia\"", "callback_relay.path_prefix:"),
            ("max_body = 0", "callback_relay.max_body:"),
            (
                "max_in_flight_bytes = 10\nmax_body = 100",
                "callback_relay.max_in_flight_bytes:",
            ),
            ("max_age = \"0s\"", "callback_relay.max_age:"),
            (
                "per_target_concurrency = 0",
                "callback_relay.per_target_concurrency:",
            ),
            ("listen = \"127.0.0.1:8080\"", "callback_relay.listen:"),
            ("fsync = \"never\"", "fsync"),
        ];
        for (extra, key) in cases {
            assert!(problem(&files.config(extra)).contains(key), "{extra}");
        }
        let no_keys = files
            .config("")
            .replace(&files.path("keys"), "/nonexistent/keys");
        assert!(problem(&no_keys).starts_with("callback_relay.seal_key_file:"));
        std::fs::write(files.0.path().join("bad"), "not a key").expect("write");
        let swap = |from: &str| {
            files
                .config("")
                .replace(&files.path(from), &files.path("bad"))
        };
        assert!(problem(&swap("keys")).starts_with("callback_relay.seal_key_file:"));
        assert!(problem(&swap("token")).starts_with("callback_relay.acquirer.path_token_file:"));
        assert!(
            problem(&swap("cert.pem")).starts_with("callback_relay.acquirer.recipient_cert_file:")
        );
        assert!(problem(&swap("whsec")).starts_with("callback_relay.target.signing_secret_file:"));
        let unknown_target = files
            .config("")
            .replace("default_target = \"t1\"", "default_target = \"t9\"");
        assert!(problem(&unknown_target).starts_with("callback_relay.acquirer.default_target:"));
        let no_acquirer = "[callback_relay]\nenabled = true\nseal_key_file = \"x\"\n";
        assert!(problem(no_acquirer).starts_with("callback_relay."));
    }
}
