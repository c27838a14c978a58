//! Hot reload: re-read the config file (SIGHUP or `POST /reload` on the admin port) and
//! swap one whole validated snapshot; an invalid file is refused and the old config keeps
//! serving. TLS certificates are re-read too; open connections are never dropped.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::proxy::Gateway;

/// Knows where the config came from and what to swap.
pub struct Reloader {
    path: PathBuf,
    gateway: Arc<Gateway>,
    tls: Option<Arc<ArcSwap<TlsAcceptor>>>,
}

impl Reloader {
    /// A reloader for a gateway started from `path`.
    #[must_use]
    pub fn new(
        path: PathBuf,
        gateway: Arc<Gateway>,
        tls: Option<Arc<ArcSwap<TlsAcceptor>>>,
    ) -> Self {
        Self { path, gateway, tls }
    }

    /// Loads, validates and applies the file. Everything fallible (parsing, validation,
    /// certificates) happens before anything is swapped.
    pub fn reload(&self) -> Result<(), String> {
        let result = self.try_reload();
        match &result {
            Ok(()) => tracing::info!(path = %self.path.display(), "config reloaded"),
            Err(problem) => {
                tracing::error!(path = %self.path.display(), %problem, "config reload refused; the previous config keeps serving");
            }
        }
        result
    }

    fn try_reload(&self) -> Result<(), String> {
        // Only the first line of a parse error: the rest quotes the file, which may hold secrets.
        let config = Config::load(&self.path)
            .map_err(|e| e.to_string().lines().next().unwrap_or_default().to_owned())?;
        let acceptor = match (&self.tls, &config.server.tls) {
            (Some(_), Some(tls)) => Some(TlsAcceptor::from(crate::tls::server_config(
                &tls.cert,
                &tls.key,
                tls.client_ca.as_deref(),
            )?)),
            (Some(_), None) => {
                return Err("server.tls: TLS cannot be turned off by a reload; restart".to_owned());
            }
            (None, Some(_)) => {
                return Err("server.tls: TLS cannot be turned on by a reload; restart".to_owned());
            }
            (None, None) => None,
        };
        if let (Some(slot), Some(acceptor)) = (&self.tls, acceptor) {
            slot.store(Arc::new(acceptor));
        }
        self.gateway.apply(config);
        Ok(())
    }
}
