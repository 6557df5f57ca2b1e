//! Printing an error with its causes, each once.
//!
//! Many error types name their cause in their own message (`cannot lock x: Permission
//! denied`) and expose it as `source` as well; printing the chain line by line then
//! repeats it (`error: cannot lock x: Permission denied` / `caused by: Permission
//! denied`). [`causes_once`] keeps each message only when no message before it names it
//! already. `berth` and `berth-vmm` print their errors through it.

/// The messages of an error chain (the error first, then its causes), keeping a cause
/// only when no message kept before it contains it already.
pub fn causes_once(chain: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut kept: Vec<String> = Vec::new();
    for message in chain {
        let message = message.trim().to_owned();
        if message.is_empty() || kept.iter().any(|k| k.contains(&message)) {
            continue;
        }
        kept.push(message);
    }
    kept
}

/// An error and its causes on one line (`a: b: c`), each cause once, for a log field or
/// a status message.
pub fn one_line(error: &(dyn std::error::Error + 'static)) -> String {
    let chain = std::iter::successors(Some(error), |e| e.source()).map(|e| e.to_string());
    causes_once(chain).join(": ")
}

/// Prints an error chain to stderr through [`causes_once`]: `error: <message>`, then
/// one `<cause_prefix><cause>` line per cause kept.
pub fn eprint_chain(chain: impl IntoIterator<Item = String>, cause_prefix: &str) {
    for (i, line) in causes_once(chain).iter().enumerate() {
        if i == 0 {
            eprintln!("error: {line}");
        } else {
            eprintln!("{cause_prefix}{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_joins_the_causes_each_once() {
        let inner = std::io::Error::other("disk full");
        let outer = std::io::Error::other(OuterError(inner));
        assert_eq!(one_line(&outer), "writing x: disk full");
    }

    #[derive(Debug)]
    struct OuterError(std::io::Error);
    impl std::fmt::Display for OuterError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "writing x: {}", self.0)
        }
    }
    impl std::error::Error for OuterError {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_cause_named_in_a_message_is_not_repeated() {
        let chain = [
            "starting guest a: cannot lock /x: Permission denied (os error 13)",
            "cannot lock /x: Permission denied (os error 13)",
            "Permission denied (os error 13)",
        ];
        assert_eq!(
            causes_once(chain.map(str::to_owned)),
            vec![chain[0].to_owned()]
        );
        // A cause the message does not name is kept, in order.
        let chain = ["reading the manifests", "no such file", "no such file"];
        assert_eq!(
            causes_once(chain.map(str::to_owned)),
            vec![
                "reading the manifests".to_owned(),
                "no such file".to_owned()
            ]
        );
    }
}
