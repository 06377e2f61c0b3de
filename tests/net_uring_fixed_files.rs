//! Do direct (registered) descriptors pay for sockets here? Measures the
//! same socket operations through a plain descriptor and through a
//! registered one (ignored by default; see docs/uring.md).

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Instant;

use io_uring::{opcode, squeue, types, IoUring};

const BATCH: usize = 64;

/// Submits `total` copies of `entry` in batches and waits for each batch.
fn run(ring: &mut IoUring, entry: &squeue::Entry, total: usize) -> f64 {
    let start = Instant::now();
    let mut done = 0;
    while done < total {
        {
            let mut sq = ring.submission();
            for _ in 0..BATCH {
                // SAFETY: the entries point only to `PAYLOAD` (a static) or
                // to no memory at all (a recv into a zero-length buffer), so
                // nothing they use can be freed before they complete; we
                // wait for every completion below.
                unsafe { sq.push(entry) }.expect("room");
            }
        }
        ring.submit_and_wait(BATCH).expect("enter");
        let cq = ring.completion();
        done += cq.count();
    }
    start.elapsed().as_nanos() as f64 / total as f64
}

static PAYLOAD: [u8; 100] = [7u8; 100];

#[test]
#[ignore]
fn direct_descriptors_versus_plain_descriptors() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (mut server, _) = listener.accept().expect("accept");
    client.set_nodelay(true).expect("nodelay");
    // Drain what the client sends so sends never block.
    let sink = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        while matches!(server.read(&mut buf), Ok(n) if n > 0) {}
    });
    let mut ring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(256)
        .expect("ring");
    ring.submitter()
        .register_files(&[client.as_raw_fd()])
        .expect("register");
    let fd = client.as_raw_fd();
    let total = 100_000;
    let send_plain = opcode::Send::new(types::Fd(fd), PAYLOAD.as_ptr(), PAYLOAD.len() as u32)
        .flags(libc::MSG_NOSIGNAL)
        .build();
    let send_fixed = opcode::Send::new(types::Fixed(0), PAYLOAD.as_ptr(), PAYLOAD.len() as u32)
        .flags(libc::MSG_NOSIGNAL)
        .build();
    // A recv on a socket with nothing to read, non-blocking: almost only the
    // descriptor lookup and the socket call.
    let recv_plain = opcode::Recv::new(types::Fd(fd), std::ptr::null_mut(), 0)
        .flags(libc::MSG_DONTWAIT)
        .build();
    let recv_fixed = opcode::Recv::new(types::Fixed(0), std::ptr::null_mut(), 0)
        .flags(libc::MSG_DONTWAIT)
        .build();
    // Warm up, then alternate to spread noise over both.
    run(&mut ring, &send_plain, 10_000);
    run(&mut ring, &send_fixed, 10_000);
    let mut results = [0f64; 4];
    for _ in 0..3 {
        results[0] += run(&mut ring, &send_plain, total) / 3.0;
        results[1] += run(&mut ring, &send_fixed, total) / 3.0;
        results[2] += run(&mut ring, &recv_plain, total) / 3.0;
        results[3] += run(&mut ring, &recv_fixed, total) / 3.0;
    }
    println!(
        "100-byte send: plain {:.0} ns, direct {:.0} ns per op; \
         empty recv: plain {:.0} ns, direct {:.0} ns per op ({BATCH} per enter)",
        results[0], results[1], results[2], results[3]
    );
    drop(ring);
    drop(client);
    sink.join().expect("sink");
}
