//! A multishot accept that fails for lack of descriptors (EMFILE) is
//! re-armed after a pause and accepts once descriptors are free again.
//! Its own test binary: it lowers the process's open-file limit.

use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use glommio::LocalExecutorBuilder;
use switchboard::net::uring::{Driver, DriverConfig, Event};

#[test]
fn accept_out_of_descriptors_is_retried_until_descriptors_free_up() {
    LocalExecutorBuilder::default()
        .make()
        .expect("executor")
        .run(async {
            let mut driver = Driver::new(DriverConfig::for_tests()).expect("driver");
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            // The handshakes complete into the accept queue before the
            // driver accepts.
            let clients: Vec<TcpStream> = (0..3)
                .map(|_| TcpStream::connect(addr).expect("connect"))
                .collect();
            // Use up every descriptor the limit allows.
            let (soft, hard) =
                nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                    .expect("getrlimit");
            nix::sys::resource::setrlimit(
                nix::sys::resource::Resource::RLIMIT_NOFILE,
                256.min(soft),
                hard,
            )
            .expect("setrlimit");
            let mut filler: Vec<OwnedFd> = Vec::new();
            let probe = OwnedFd::from(listener.try_clone().expect("clone"));
            while let Ok(fd) = probe.try_clone() {
                filler.push(fd);
            }
            driver.listen(OwnedFd::from(listener)).expect("listen");
            let mut accepted = 0;
            let mut events = Vec::new();
            let notifier = driver.notifier();
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut freed = false;
            while accepted < 3 {
                assert!(Instant::now() < deadline, "timed out");
                driver.poll_events(&mut events).expect("poll");
                for event in events.drain(..) {
                    if let Event::Accepted { .. } = event {
                        accepted += 1;
                    }
                }
                if !freed && driver.stats().accept_retries >= 2 {
                    // Retried while out of descriptors; now free some.
                    assert_eq!(accepted, 0);
                    filler.clear();
                    freed = true;
                }
                futures_lite::future::or(
                    notifier.wait(),
                    glommio::timer::sleep(Duration::from_millis(10)),
                )
                .await;
            }
            assert!(freed, "accepts failed before descriptors were freed");
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, soft, hard)
                .expect("restore");
            drop(clients);
        });
}
