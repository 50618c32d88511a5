//! The spool's redb file: opening it (a locked, damaged or unreadable file is a
//! clear [`OpenError`], never a panic) and the reopenable handle the writer and
//! readers share, so a failed write (a full disk, say) is recovered from by
//! closing and opening the file again.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use redb::{Database, DatabaseError, ReadableDatabase};

use super::writer::CompactError;
use super::{OpenError, ReadError, read_err};

/// redb's page cache. Its 1 GiB default would dwarf the rest of the process; the
/// hot data (recent envelopes, the due index) is small.
const CACHE_BYTES: usize = 8 * 1024 * 1024;

/// Opens (creating if needed, with its directory) the database at `path`.
pub(super) fn open_file(path: &Path) -> Result<Database, OpenError> {
    let io = |reason: String| OpenError::Io {
        path: path.to_owned(),
        reason,
    };
    let corrupt = |reason: String| OpenError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| io(format!("cannot create {}: {e}", dir.display())))?;
    }
    match open_database(path) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(DatabaseError::DatabaseAlreadyOpen)) => Err(OpenError::Locked {
            path: path.to_owned(),
        }),
        Ok(Err(DatabaseError::Storage(redb::StorageError::Io(e)))) => Err(match e.kind() {
            // How redb reports a file that does not start like a database.
            std::io::ErrorKind::InvalidData => corrupt(e.to_string()),
            std::io::ErrorKind::UnexpectedEof => {
                corrupt(format!("the file ends early (truncated?): {e}"))
            }
            _ => io(e.to_string()),
        }),
        Ok(Err(e)) => Err(corrupt(e.to_string())),
        Err(_) => Err(corrupt("the storage engine failed while reading it".into())),
    }
}

/// redb documents that opening a file altered behind its back may panic; a
/// damaged spool must be a clear error instead (`Err` here).
fn open_database(path: &Path) -> std::thread::Result<Result<Database, DatabaseError>> {
    std::panic::catch_unwind(|| Database::builder().set_cache_size(CACHE_BYTES).create(path))
}

/// The database, reopenable: after a failed write (a full disk, say) redb
/// refuses every later operation until the file is closed and opened again,
/// which is how the spool recovers once the cause is gone.
pub(super) struct Store {
    path: PathBuf,
    /// `None` while closed for reopening (or if reopening failed).
    db: RwLock<Option<Database>>,
}

impl Store {
    pub(super) fn new(path: &Path, db: Database) -> Store {
        Store {
            path: path.to_owned(),
            db: RwLock::new(Some(db)),
        }
    }

    pub(super) fn begin_read(&self) -> Result<redb::ReadTransaction, ReadError> {
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        let db = guard
            .as_ref()
            .ok_or_else(|| ReadError("the spool is being reopened after a write error".into()))?;
        db.begin_read().map_err(read_err)
    }

    pub(super) fn begin_write(&self) -> Result<redb::WriteTransaction, redb::Error> {
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        let db = guard.as_ref().ok_or(redb::Error::PreviousIo)?;
        db.begin_write().map_err(Into::into)
    }

    /// Closes and opens the file again; on failure the store stays closed and
    /// the next write tries again.
    pub(super) fn reopen(&self) {
        let mut guard = self.db.write().unwrap_or_else(|p| p.into_inner());
        drop(guard.take());
        match open_database(&self.path) {
            Ok(Ok(db)) => {
                tracing::warn!(path = %self.path.display(), "spool reopened after a write error");
                *guard = Some(db);
            }
            Ok(Err(e)) => tracing::error!(error = %e, "cannot reopen the spool yet"),
            Err(_) => tracing::error!("the storage engine failed while reopening the spool"),
        }
    }

    /// The file's length, if it can be read.
    pub(super) fn file_len(&self) -> Option<u64> {
        std::fs::metadata(&self.path).ok().map(|m| m.len())
    }

    /// Compacts the file: redb moves the live pages to its start and cuts
    /// off the end. Readers and the writer wait meanwhile (this holds the
    /// handle exclusively). Call it from the writer thread only, between
    /// batches, so no write transaction is open.
    pub(super) fn compact(&self) -> Result<bool, CompactError> {
        let mut guard = self.db.write().unwrap_or_else(|p| p.into_inner());
        let db = guard
            .as_mut()
            .ok_or_else(|| CompactError::Failed("the spool is closed".into()))?;
        match db.compact() {
            Ok(done) => Ok(done),
            Err(redb::CompactionError::TransactionInProgress) => Err(CompactError::Busy),
            Err(e) => Err(CompactError::Failed(e.to_string())),
        }
    }

    pub(super) fn is_open(&self) -> bool {
        self.db.read().map(|g| g.is_some()).unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::super::Spool;
    use super::*;

    #[test]
    fn a_second_opener_gets_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let _first = Spool::open(&path, 1 << 20).unwrap();
        let err = Spool::open(&path, 1 << 20).err().unwrap();
        assert!(matches!(err, OpenError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("in use by another process"));
    }

    #[test]
    fn garbage_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        std::fs::write(&path, vec![0x5a; 64 * 1024]).unwrap();
        let err = Spool::open(&path, 1 << 20).err().unwrap();
        assert!(matches!(err, OpenError::Corrupt { .. }), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }
}
