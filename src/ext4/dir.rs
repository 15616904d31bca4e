//! Directory blocks. Hashed (htree) directories are read as plain blocks
//! too: their index blocks look like one empty entry spanning the block,
//! which is how ext4 stays readable by ext2 code.

use super::{corrupt, u16_at, u32_at, Ext4, Inode, Kind, ReadAt, Result};

/// A directory larger than this is refused (a few million entries).
const MAX_DIR_BYTES: u64 = 256 << 20;

#[derive(Debug, Clone, PartialEq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u32,
}

pub fn read<R: ReadAt>(fs: &Ext4<R>, inode: &Inode) -> Result<Vec<DirEntry>> {
    if inode.kind != Kind::Dir {
        return corrupt(format!("inode {} is not a directory", inode.ino));
    }
    if inode.size > MAX_DIR_BYTES {
        return corrupt(format!(
            "directory inode {} is {} bytes",
            inode.ino, inode.size
        ));
    }
    let mut data = Vec::with_capacity(inode.size as usize);
    fs.read_data(inode, &mut |b| {
        data.extend_from_slice(b);
        Ok(())
    })?;
    let bs = fs.block_size() as usize;
    let mut out = Vec::new();
    for block in data.chunks(bs) {
        parse_block(inode.ino, block, bs, &mut out)?;
    }
    Ok(out)
}

fn parse_block(ino: u32, block: &[u8], bs: usize, out: &mut Vec<DirEntry>) -> Result<()> {
    let mut pos = 0;
    while pos + 8 <= block.len() {
        let child = u32_at(block, pos);
        let mut rec_len = usize::from(u16_at(block, pos + 4));
        if bs >= 65536 && (rec_len == 0 || rec_len == 65535) {
            rec_len = bs;
        }
        let name_len = usize::from(block[pos + 6]);
        if rec_len < 8 || rec_len % 4 != 0 || pos + rec_len > block.len() {
            return corrupt(format!(
                "directory inode {ino}: entry at {pos} has length {rec_len}"
            ));
        }
        if child != 0 {
            if name_len == 0 || 8 + name_len > rec_len {
                return corrupt(format!(
                    "directory inode {ino}: entry at {pos} has a {name_len}-byte name"
                ));
            }
            let name = &block[pos + 8..pos + 8 + name_len];
            if name.contains(&b'/') || name.contains(&0) {
                return corrupt(format!(
                    "directory inode {ino}: a name holds '/' or NUL: {:?}",
                    String::from_utf8_lossy(name)
                ));
            }
            if name != b"." && name != b".." {
                out.push(DirEntry {
                    name: name.to_vec(),
                    ino: child,
                });
            }
        }
        pos += rec_len;
    }
    Ok(())
}
