use super::packet::OP_RW;
use super::*;

#[test]
fn stray_packets_cannot_grow_the_reset_queue_without_bound() {
    let dir = tempfile::tempdir().unwrap();
    let mut v = Vsock::new(3, &dir.path().join("v.sock")).unwrap();
    for port in 0..100_000u32 {
        v.handle_tx(
            Header {
                src_cid: 3,
                dst_cid: HOST_CID,
                src_port: port,
                dst_port: 7,
                len: 0,
                type_: TYPE_STREAM,
                op: OP_RW,
                flags: 0,
                buf_alloc: 0,
                fwd_cnt: 0,
            },
            Vec::new(),
        );
    }
    assert!(v.rx_control.len() <= MAX_CLIENTS + MAX_STRAY_RESETS);
    assert!(!v.rx_control.is_empty(), "strays still get resets");
}

#[test]
fn connect_lines() {
    assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
    assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
    assert_eq!(parse_connect(b"CONNECT"), None);
    assert_eq!(parse_connect(b"CONNECT -1"), None);
    assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
    assert_eq!(parse_connect(b"connect 52"), None);
    assert_eq!(parse_connect(b"\xff\xfe"), None);
}
