//! Hot reload: re-read the config file (SIGHUP or `POST /reload` on the admin port), build
//! it into [`Settings`] and swap its hot half whole. A file that cannot be built, or whose
//! cold half differs from the running one, is refused naming the keys; the old settings
//! keep serving. TLS certificates and API keys are rebuilt each time; open connections
//! are never dropped.

use std::path::PathBuf;
use std::sync::Arc;

use crate::gateway::Gateway;
use crate::settings::{Cold, Settings};

/// Knows where the config came from and what it may not change.
pub struct Reloader {
    path: PathBuf,
    running: Cold,
    gateway: Arc<Gateway>,
}

impl Reloader {
    /// A reloader for a gateway started from `path` with the cold settings `running`.
    #[must_use]
    pub fn new(path: PathBuf, running: Cold, gateway: Arc<Gateway>) -> Self {
        Self {
            path,
            running,
            gateway,
        }
    }

    /// Loads, builds and swaps. Everything fallible happens before anything is swapped.
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
        let settings = Settings::load(&self.path)
            .map_err(|e| e.to_string().lines().next().unwrap_or_default().to_owned())?;
        let changed = self.running.changed_keys(&settings.cold);
        if !changed.is_empty() {
            return Err(format!(
                "{}: only a restart can change {}; nothing was applied",
                changed.join(", "),
                if changed.len() == 1 {
                    "this key"
                } else {
                    "these keys"
                }
            ));
        }
        let hot = Arc::try_unwrap(settings.hot).map_err(|_| "settings are shared".to_owned())?;
        self.gateway.swap_hot(hot);
        Ok(())
    }
}
