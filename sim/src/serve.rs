//! The simulator's own accept loop: HTTP/1.1 and h2c on one port, stopped by a watch flag.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::Simulator;

/// What the simulator answers.
pub type SimResponse = Response<Full<Bytes>>;

/// Serves until `stop` turns true, then gives open connections a second to finish.
pub async fn accept_loop(
    listener: TcpListener,
    simulator: Arc<Simulator>,
    mut stop: watch::Receiver<bool>,
) {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stopped| *stopped) => break,
        };
        let Ok((stream, _peer)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        simulator.state.connection_opened();
        let simulator = Arc::clone(&simulator);
        let service = service_fn(move |request| {
            let simulator = Arc::clone(&simulator);
            async move { Ok::<_, Infallible>(simulator.handle(request).await) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let watched = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = watched.await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(1), graceful.shutdown()).await;
}
