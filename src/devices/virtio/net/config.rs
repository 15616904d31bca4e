//! What a VM's user-mode network looks like: the same addresses in every
//! VM (each has its own passt, so forks with equal addresses never meet),
//! and the TCP ports published on the host.

use std::net::Ipv4Addr;
use std::path::PathBuf;

/// The guest's address, its gateway (connections to it reach the host's
/// loopback, as passt maps them) and the DNS forwarder passt answers on.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
pub const PREFIX_LEN: u8 = 24;
/// Locally administered, fixed: a fork keeps its source's MAC (the guest
/// driver read it at boot), so every VM has the same one.
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// `-p [ADDR:]HOST_PORT:GUEST_PORT`: TCP on ADDR (default 127.0.0.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortMap {
    pub addr: Ipv4Addr,
    pub host: u16,
    pub guest: u16,
}

impl std::str::FromStr for PortMap {
    type Err = String;

    fn from_str(s: &str) -> Result<PortMap, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let (addr, host, guest) = match parts.as_slice() {
            [h, g] => (Ipv4Addr::LOCALHOST, *h, *g),
            [a, h, g] => (
                a.parse()
                    .map_err(|_| format!("published port {s:?}: {a:?} is not an IPv4 address"))?,
                *h,
                *g,
            ),
            _ => {
                return Err(format!(
                    "published port {s:?}: use [ADDR:]HOST_PORT:GUEST_PORT"
                ))
            }
        };
        let port = |p: &str| match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!(
                "published port {s:?}: {p:?} is not a port (1-65535)"
            )),
        };
        Ok(PortMap {
            addr,
            host: port(host)?,
            guest: port(guest)?,
        })
    }
}

impl std::fmt::Display for PortMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.addr, self.host, self.guest)
    }
}

/// Refuses two mappings of one host address and port.
pub fn check_unique(ports: &[PortMap]) -> Result<(), String> {
    for (i, a) in ports.iter().enumerate() {
        if let Some(b) = ports[i + 1..].iter().find(|b| {
            b.host == a.host
                && (b.addr == a.addr || a.addr.is_unspecified() || b.addr.is_unspecified())
        }) {
            return Err(format!(
                "published ports {a} and {b} both take host port {}",
                a.host
            ));
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct NetConfig {
    pub ports: Vec<PortMap>,
    /// passt's output (its errors name what failed, such as a busy port).
    pub passt_log: Option<PathBuf>,
}

/// The kernel's static IP configuration (CONFIG_IP_PNP): no DHCP round
/// trips at boot, and the same on every VM.
pub fn kernel_ip_arg() -> String {
    format!("ip={GUEST_IP}::{GATEWAY}:255.255.255.0::eth0:off microagent.dns={DNS}")
}

/// A gratuitous ARP from the guest's MAC and address: the frame the VMM
/// sends a new passt on the guest's behalf. passt starts out sending to the
/// broadcast MAC until it has seen a frame from the guest, and Linux drops
/// TCP segments that arrive link-layer broadcast (`PACKET_BROADCAST`): a
/// guest that has sent nothing since its passt started (a fork, a rollback,
/// a guest that only serves) would never see an inbound connection's SYN.
pub fn guest_announcement() -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]); // to everyone
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&0x0806u16.to_be_bytes()); // ARP
    f.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&1u16.to_be_bytes()); // request
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&GUEST_IP.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&GUEST_IP.octets()); // target = sender: gratuitous
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announcement_is_a_gratuitous_arp_from_the_guest() {
        let f = guest_announcement();
        assert_eq!(f.len(), 42);
        assert_eq!(&f[6..12], &GUEST_MAC, "source MAC: what passt learns");
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[22..28], &GUEST_MAC);
        assert_eq!(&f[28..32], &GUEST_IP.octets());
        assert_eq!(&f[38..42], &GUEST_IP.octets());
    }

    #[test]
    fn port_specs_parse_and_refuse_junk() {
        assert_eq!(
            "8080:80".parse::<PortMap>().unwrap(),
            PortMap {
                addr: Ipv4Addr::LOCALHOST,
                host: 8080,
                guest: 80
            }
        );
        assert_eq!(
            "0.0.0.0:8443:443".parse::<PortMap>().unwrap().addr,
            Ipv4Addr::UNSPECIFIED
        );
        for bad in ["80", "a:80", "1:2:3:4", "0:80", "70000:80", "host:1:2", ""] {
            assert!(bad.parse::<PortMap>().is_err(), "{bad}");
        }
        let p = |s: &str| s.parse::<PortMap>().unwrap();
        assert!(check_unique(&[p("8080:80"), p("8081:80")]).is_ok());
        assert!(check_unique(&[p("8080:80"), p("8080:81")]).is_err());
        assert!(check_unique(&[p("0.0.0.0:8080:80"), p("127.0.0.1:8080:81")]).is_err());
    }
}
