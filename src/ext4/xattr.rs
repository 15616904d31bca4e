//! Extended attributes: in the inode after its extra fields, and in one
//! block the inode points to. Values kept in their own inodes (`ea_inode`)
//! are refused.

use super::{corrupt, u16_at, u32_at, Ext4, Ext4Error, Inode, ReadAt, Result};

const MAGIC: u32 = 0xEA02_0000;
const BLOCK_HEADER: usize = 32;

#[derive(Debug, Clone, PartialEq)]
pub struct Xattr {
    /// Full name with its namespace, e.g. `trusted.overlay.opaque`.
    pub name: String,
    pub value: Vec<u8>,
}

fn prefix(index: u8) -> Option<&'static str> {
    Some(match index {
        1 => "user.",
        2 => "system.posix_acl_access",
        3 => "system.posix_acl_default",
        4 => "trusted.",
        6 => "security.",
        7 => "system.",
        8 => "system.richacl",
        _ => return None,
    })
}

pub fn read<R: ReadAt>(fs: &Ext4<R>, inode: &Inode) -> Result<Vec<Xattr>> {
    let mut out = Vec::new();
    // In-inode: after i_extra_isize, a magic, then entries whose value
    // offsets count from the first entry.
    if inode.extra.len() >= 2 {
        let extra_isize = usize::from(u16_at(&inode.extra, 0));
        let area = &inode.extra[extra_isize.min(inode.extra.len())..];
        if area.len() >= 4 && u32_at(area, 0) == MAGIC {
            let entries = &area[4..];
            parse(inode.ino, entries, 0, entries, &mut out)?;
        }
    }
    if inode.file_acl != 0 {
        let block = fs.read_block(inode.file_acl)?;
        if u32_at(&block, 0) != MAGIC || u32_at(&block, 8) != 1 {
            return corrupt(format!("inode {}: bad xattr block", inode.ino));
        }
        parse(inode.ino, &block, BLOCK_HEADER, &block, &mut out)?;
    }
    Ok(out)
}

/// Entries start at `start` in `area`; values are at offsets into `base`.
fn parse(ino: u32, area: &[u8], start: usize, base: &[u8], out: &mut Vec<Xattr>) -> Result<()> {
    let mut pos = start;
    while pos + 4 <= area.len() && u32_at(area, pos) != 0 {
        if pos + 16 > area.len() {
            return corrupt(format!("inode {ino}: xattr entry past its area"));
        }
        let name_len = usize::from(area[pos]);
        let index = area[pos + 1];
        let value_off = usize::from(u16_at(area, pos + 2));
        let value_inum = u32_at(area, pos + 4);
        let value_size = u32_at(area, pos + 8) as usize;
        let name_end = pos + 16 + name_len;
        if name_end > area.len() {
            return corrupt(format!("inode {ino}: xattr name past its area"));
        }
        if value_inum != 0 {
            return Err(Ext4Error::Unsupported(format!(
                "xattr values in inodes (inode {ino})"
            )));
        }
        let Some(value) = value_off
            .checked_add(value_size)
            .filter(|&e| e <= base.len())
            .map(|e| &base[value_off..e])
        else {
            return corrupt(format!("inode {ino}: xattr value past its area"));
        };
        let suffix = String::from_utf8_lossy(&area[pos + 16..name_end]);
        if let Some(p) = prefix(index) {
            out.push(Xattr {
                name: format!("{p}{suffix}"),
                value: value.to_vec(),
            });
        }
        pos = (name_end + 3) & !3;
    }
    Ok(())
}
