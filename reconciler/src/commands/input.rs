//! Where the manifests of `validate`, `plan` and `apply` come from: a path, or `-` for
//! one manifest file on standard input.

use std::io::Read;
use std::path::Path;

use berth_schema::{Diagnostic, Invalid, Validated};

/// The file name diagnostics give to standard input.
pub const STDIN_NAME: &str = "<stdin>";

/// Whether `path` means standard input.
pub fn is_stdin(path: &Path) -> bool {
    path.as_os_str() == "-"
}

/// Loads and validates the manifests at `path`, or from standard input for `-` (read
/// once, whole, as one file named `<stdin>`).
///
/// # Errors
/// [`Invalid`] with every problem, also when standard input cannot be read.
pub fn load(path: &Path) -> Result<Validated, Invalid> {
    if !is_stdin(path) {
        return berth_schema::load_path(path);
    }
    let mut bytes = Vec::new();
    let limit = berth_schema::MAX_FILE_SIZE + 1;
    if let Err(e) = std::io::stdin().lock().take(limit).read_to_end(&mut bytes) {
        return Err(Invalid {
            diagnostics: vec![Diagnostic::error(
                STDIN_NAME,
                None,
                "",
                format!("cannot read standard input: {e}"),
            )],
        });
    }
    berth_schema::load_files([(STDIN_NAME, bytes)])
}
