//! A TCP proxy on loopback that a test can cut and restore, to play a database (or exchange) outage without
//! touching the real server: cutting closes every open connection and resets new ones until restored.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

pub struct Proxy {
    pub address: SocketAddr,
    up: Arc<AtomicBool>,
    /// Bumped on every cut, so open connections notice and close.
    generation: watch::Sender<u64>,
    _stop: DropGuard,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let (generation, _) = watch::channel(0u64);
        let stop = CancellationToken::new();
        tokio::spawn({
            let up = up.clone();
            let generation = generation.clone();
            let stop = stop.clone();
            async move {
                loop {
                    let accepted = tokio::select! {
                        () = stop.cancelled() => return,
                        accepted = listener.accept() => accepted,
                    };
                    let Ok((client, _)) = accepted else { continue };
                    if !up.load(Ordering::SeqCst) {
                        let _ = socket2::SockRef::from(&client).set_linger(Some(std::time::Duration::ZERO));
                        drop(client);
                        continue;
                    }
                    let mut cut = generation.subscribe();
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream).await else { return };
                        let (mut client, mut server) = (client, server);
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = cut.changed() => {
                                let _ = socket2::SockRef::from(&client).set_linger(Some(std::time::Duration::ZERO));
                            }
                            () = stop.cancelled() => {}
                        }
                    });
                }
            }
        });
        Proxy { address, up, generation, _stop: stop.drop_guard() }
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.generation.send_modify(|generation| *generation += 1);
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}
