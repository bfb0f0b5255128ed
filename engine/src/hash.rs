//! Content hashes of external inputs (files and folders) with a memo keyed by
//! (device, inode, size, mtime_ns), so an unchanged multi-GB input is never read twice.
//! Files are hashed with mmap + rayon (blake3's `update_mmap_rayon`).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::key::{ContentHash, Key};

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a regular file or folder")]
    NotAFile { path: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HashError + '_ {
    move |source| HashError::Io { path: path.to_path_buf(), source }
}

/// Counters of one hashing session, for logs and benchmarks.
#[derive(Debug, Default)]
pub struct HashStats {
    pub files_read: AtomicU64,
    pub bytes_read: AtomicU64,
    pub memo_hits: AtomicU64,
}

/// The memo of file content hashes. `dir` is `None` for a memo-less hasher (tests, `verify`).
#[derive(Debug)]
pub struct Hasher {
    dir: Option<PathBuf>,
    pub stats: HashStats,
}

/// The identity of a file version as the filesystem reports it. A file rewritten in place keeps
/// its inode but changes mtime (ns resolution) or size; a replaced file gets a new inode.
fn file_id(meta: &fs::Metadata) -> String {
    format!(
        "{:x}-{:x}-{:x}-{}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128
    )
}

impl Hasher {
    pub fn new(memo_dir: Option<PathBuf>) -> Self {
        Self { dir: memo_dir, stats: HashStats::default() }
    }

    /// The content hash of a file, or of a folder as a Merkle hash of its sorted relative paths and
    /// file hashes (symlinks are followed, as in a Hugging Face snapshot folder).
    pub fn hash_path(&self, path: &Path) -> Result<ContentHash, HashError> {
        let meta = fs::metadata(path).map_err(io(path))?;
        if meta.is_file() {
            self.hash_file(path, &meta)
        } else if meta.is_dir() {
            let mut files = Vec::new();
            collect_files(path, Path::new(""), &mut files)?;
            files.sort();
            let hashes: Vec<ContentHash> = {
                use rayon::prelude::*;
                files
                    .par_iter()
                    .map(|rel| {
                        let full = path.join(rel);
                        let meta = fs::metadata(&full).map_err(io(&full))?;
                        self.hash_file(&full, &meta)
                    })
                    .collect::<Result<_, _>>()?
            };
            let mut h = blake3::Hasher::new();
            h.update(b"pipe-dir\0");
            h.update(&(files.len() as u64).to_le_bytes());
            for (rel, fh) in files.iter().zip(&hashes) {
                let rel = rel.to_string_lossy();
                h.update(&(rel.len() as u64).to_le_bytes());
                h.update(rel.as_bytes());
                h.update(fh.as_bytes());
            }
            Ok(Key::from_bytes(*h.finalize().as_bytes()))
        } else {
            Err(HashError::NotAFile { path: path.to_path_buf() })
        }
    }

    fn memo_path(&self, id: &str) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        Some(dir.join(&id[..2.min(id.len())]).join(id))
    }

    /// The memo entries of a file version: by device and inode (exact on one machine), and by
    /// path and inode, which another machine mounting the same shared filesystem at the same
    /// path also finds (device numbers of network mounts differ between machines; NFS inode
    /// numbers do not), so cluster jobs do not re-read model files the coordinator hashed.
    fn memo_paths(&self, path: &Path, meta: &fs::Metadata) -> Vec<PathBuf> {
        let canonical = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let at = blake3::hash(canonical.as_os_str().as_encoded_bytes()).to_hex();
        let shared = format!(
            "{}-{:x}-{:x}-{}",
            &at[..16],
            meta.ino(),
            meta.size(),
            meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128
        );
        [file_id(meta), shared].iter().filter_map(|id| self.memo_path(id)).collect()
    }

    fn hash_file(&self, path: &Path, meta: &fs::Metadata) -> Result<ContentHash, HashError> {
        let memos = self.memo_paths(path, meta);
        for m in &memos {
            if let Ok(hex) = fs::read_to_string(m)
                && let Some(k) = Key::parse(hex.trim())
            {
                self.stats.memo_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(k);
            }
        }
        tracing::debug!(path = %path.display(), bytes = meta.size(), "hashing");
        let hash = hash_file_contents(path)?;
        self.stats.files_read.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes_read.fetch_add(meta.size(), Ordering::Relaxed);
        // The file may have changed while it was read; memoize only if its identity held.
        if fs::metadata(path).map(|after| file_id(&after) == file_id(meta)).unwrap_or(false) {
            for m in &memos {
                // A lost memo write only costs a re-read later; never fail the run for it.
                let _ = crate::store::write_atomic(m, hash.hex().as_bytes());
            }
        }
        Ok(hash)
    }
}

/// blake3 of a file's bytes, mmapped and hashed on all cores (small files are read directly).
pub fn hash_file_contents(path: &Path) -> Result<ContentHash, HashError> {
    let mut h = blake3::Hasher::new();
    h.update_mmap_rayon(path).map_err(io(path))?;
    Ok(Key::from_bytes(*h.finalize().as_bytes()))
}

fn collect_files(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<(), HashError> {
    let dir = root.join(rel);
    for entry in fs::read_dir(&dir).map_err(io(&dir))? {
        let entry = entry.map_err(io(&dir))?;
        let rel_child = rel.join(entry.file_name());
        let full = root.join(&rel_child);
        let meta = fs::metadata(&full).map_err(io(&full))?;
        if meta.is_dir() {
            collect_files(root, &rel_child, out)?;
        } else if meta.is_file() {
            out.push(rel_child);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memo_avoids_rereading_and_sees_changes() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("data.bin");
        fs::write(&f, b"hello").unwrap();
        let h = Hasher::new(Some(t.path().join("memo")));
        let a = h.hash_path(&f).unwrap();
        assert_eq!(a, hash_file_contents(&f).unwrap());
        assert_eq!(h.hash_path(&f).unwrap(), a);
        assert_eq!(h.stats.files_read.load(Ordering::Relaxed), 1);
        assert_eq!(h.stats.memo_hits.load(Ordering::Relaxed), 1);
        fs::write(&f, b"hellp").unwrap();
        let b = h.hash_path(&f).unwrap();
        assert_ne!(a, b);
        assert_eq!(h.stats.files_read.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn another_machine_finds_the_memo_by_path() {
        // Another node sees the shared file under another device number: only the entry keyed by
        // path and inode is there for it.
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("model.safetensors");
        fs::write(&f, b"weights").unwrap();
        let memo = t.path().join("memo");
        let h = Hasher::new(Some(memo.clone()));
        let a = h.hash_path(&f).unwrap();
        let local =
            memo.join(&file_id(&fs::metadata(&f).unwrap())[..2]).join(file_id(&fs::metadata(&f).unwrap()));
        fs::remove_file(&local).unwrap();
        let other = Hasher::new(Some(memo));
        assert_eq!(other.hash_path(&f).unwrap(), a);
        assert_eq!(other.stats.files_read.load(Ordering::Relaxed), 0, "found by path");
        assert_eq!(other.stats.memo_hits.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn folder_hash_covers_names_and_contents() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("model");
        fs::create_dir_all(d.join("sub")).unwrap();
        fs::write(d.join("config.json"), b"{}").unwrap();
        fs::write(d.join("sub/w.safetensors"), b"weights").unwrap();
        let h = Hasher::new(None);
        let a = h.hash_path(&d).unwrap();
        fs::rename(d.join("config.json"), d.join("config2.json")).unwrap();
        let b = h.hash_path(&d).unwrap();
        assert_ne!(a, b);
        fs::rename(d.join("config2.json"), d.join("config.json")).unwrap();
        assert_eq!(h.hash_path(&d).unwrap(), a);
    }

    #[test]
    fn missing_file_names_the_path() {
        let h = Hasher::new(None);
        let e = h.hash_path(Path::new("/nonexistent/x.bin")).unwrap_err();
        assert!(e.to_string().starts_with("/nonexistent/x.bin: "), "{e}");
    }
}
