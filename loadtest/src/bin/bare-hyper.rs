//! `bare-hyper`: the floor for comparisons. A hyper HTTP/1.1 server that answers every
//! request with the same small JSON, reading (and dropping) the request body, on a
//! current-thread runtime (`--threads 1`, the default) or a multi-thread one.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 18070));
    let mut threads = 1usize;
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--listen", Some(value)) => listen = value.parse().unwrap_or(listen),
            ("--threads", Some(value)) => threads = value.parse().unwrap_or(1),
            _ => {
                eprintln!("usage: bare-hyper [--listen ADDR] [--threads N]");
                std::process::exit(2);
            }
        }
    }
    let runtime = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let Ok(runtime) = runtime else {
        eprintln!("bare-hyper: cannot start the runtime");
        std::process::exit(1);
    };
    runtime.block_on(serve(listen));
}

async fn serve(listen: SocketAddr) {
    let Ok(listener) = tokio::net::TcpListener::bind(listen).await else {
        eprintln!("bare-hyper: cannot bind {listen}");
        std::process::exit(1);
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(|request: http::Request<hyper::body::Incoming>| async {
                let _ = request.into_body().collect().await;
                let mut response =
                    http::Response::new(Full::new(Bytes::from_static(br#"{"success":true}"#)));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json; charset=utf-8"),
                );
                Ok::<_, Infallible>(response)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
