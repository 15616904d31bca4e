//! Extent trees: a header and up to four entries in the inode, index nodes
//! in blocks below it, leaves mapping logical to physical block runs.

use super::{corrupt, u16_at, u32_at, Ext4, Inode, ReadAt, Result};

const MAGIC: u16 = 0xF30A;
/// The kernel's own bound on tree depth.
const MAX_DEPTH: u16 = 5;
/// Above this an extent's length field marks it unwritten (reads as zeros).
const INIT_MAX_LEN: u16 = 32768;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub len: u64,
    pub unwritten: bool,
}

/// The extents of `inode` that cover its first `blocks` logical blocks,
/// sorted and non-overlapping; refuses a tree that is malformed or points
/// outside the filesystem.
pub fn map<R: ReadAt>(fs: &Ext4<R>, inode: &Inode, blocks: u64) -> Result<Vec<Extent>> {
    let mut out = Vec::new();
    // Depth falls at each level, so no walk loops; a well-formed tree
    // has at most one leaf per block it maps (and fewer index nodes), so
    // this bounds the work a crafted tree (one node linked many times) can
    // cause.
    let mut budget_nodes = blocks.saturating_mul(2).saturating_add(8).min(fs.blocks);
    walk(
        fs,
        inode.ino,
        &inode.block,
        None,
        blocks,
        &mut out,
        &mut budget_nodes,
    )?;
    out.sort_by_key(|e| e.logical);
    for pair in out.windows(2) {
        if pair[0].logical + pair[0].len > pair[1].logical {
            return corrupt(format!("inode {}: overlapping extents", inode.ino));
        }
    }
    Ok(out)
}

fn walk<R: ReadAt>(
    fs: &Ext4<R>,
    ino: u32,
    node: &[u8],
    expect_depth: Option<u16>,
    blocks: u64,
    out: &mut Vec<Extent>,
    budget: &mut u64,
) -> Result<()> {
    if node.len() < 12 || u16_at(node, 0) != MAGIC {
        return corrupt(format!("inode {ino}: bad extent header"));
    }
    let entries = usize::from(u16_at(node, 2));
    let depth = u16_at(node, 6);
    if depth > MAX_DEPTH || expect_depth.is_some_and(|d| d != depth) {
        return corrupt(format!("inode {ino}: extent tree depth {depth}"));
    }
    if 12 + entries * 12 > node.len() {
        return corrupt(format!("inode {ino}: {entries} extents in one node"));
    }
    for i in 0..entries {
        let e = &node[12 + i * 12..24 + i * 12];
        let logical = u64::from(u32_at(e, 0));
        if depth == 0 {
            let raw_len = u16_at(e, 4);
            let (len, unwritten) = if raw_len > INIT_MAX_LEN {
                (raw_len - INIT_MAX_LEN, true)
            } else {
                (raw_len, false)
            };
            let physical = u64::from(u32_at(e, 8)) | (u64::from(u16_at(e, 6)) << 32);
            let len = u64::from(len);
            if len == 0 || logical >= blocks {
                continue;
            }
            if physical.saturating_add(len) > fs.blocks {
                return corrupt(format!("inode {ino}: extent outside the filesystem"));
            }
            if out.len() as u64 >= blocks {
                return corrupt(format!("inode {ino}: more extents than blocks"));
            }
            out.push(Extent {
                logical,
                physical,
                len,
                unwritten,
            });
        } else {
            let child = u64::from(u32_at(e, 4)) | (u64::from(u16_at(e, 8)) << 32);
            if *budget == 0 {
                return corrupt(format!("inode {ino}: extent tree too large"));
            }
            *budget -= 1;
            let block = fs.read_block(child)?;
            walk(fs, ino, &block, Some(depth - 1), blocks, out, budget)?;
        }
    }
    Ok(())
}
