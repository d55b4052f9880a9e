//! Streamed replies (docs/protocol.md, "Streamed replies"): rows are made on the blocking pool
//! and packed into `items` frames of at most one frame each, two frames in flight at most, so
//! the daemon never holds a whole large answer and a client that stops reading stalls only
//! its own producer.

use portres_proto::{ErrorBody, MAX_FRAME};
use serde_json::Value;
use tokio::sync::mpsc;

/// Room for `{"id":N,"items":` and `}` around the array.
const ENVELOPE: usize = 64;

/// The array of one `items` frame: `[row,row,...]`, and how many rows it has.
pub(crate) struct Chunk {
    pub(crate) array: Vec<u8>,
    pub(crate) rows: u64,
}

/// The rows of a streamed reply, as they are made.
pub(crate) struct Rows {
    rx: mpsc::Receiver<Result<Chunk, ErrorBody>>,
}

impl Rows {
    /// The next chunk; `None` when every row was sent.
    pub(crate) async fn next(&mut self) -> Option<Result<Chunk, ErrorBody>> {
        self.rx.recv().await
    }
}

/// Runs `make` on the blocking pool and packs the rows it yields into chunks. Stops early when
/// the reader goes away (the session ended).
pub(crate) fn spawn_rows<I, T>(make: impl FnOnce() -> I + Send + 'static) -> Rows
where
    I: Iterator<Item = T>,
    T: serde::Serialize,
{
    let (tx, rx) = mpsc::channel(2);
    tokio::task::spawn_blocking(move || {
        let budget = MAX_FRAME - ENVELOPE;
        let mut array = Vec::with_capacity(budget);
        let mut rows = 0u64;
        array.push(b'[');
        for row in make() {
            let mut bytes = serde_json::to_vec(&row).expect("rows serialise");
            if bytes.len() > budget - 2 {
                bytes = fit(
                    serde_json::to_value(&row).expect("rows serialise"),
                    budget - 2,
                );
            }
            if array.len() + bytes.len() + 2 > budget && rows > 0 {
                array.push(b']');
                let full = std::mem::replace(&mut array, Vec::with_capacity(budget));
                if tx.blocking_send(Ok(Chunk { array: full, rows })).is_err() {
                    return;
                }
                array.push(b'[');
                rows = 0;
            }
            if rows > 0 {
                array.push(b',');
            }
            array.extend_from_slice(&bytes);
            rows += 1;
        }
        if rows > 0 {
            array.push(b']');
            let _ = tx.blocking_send(Ok(Chunk { array, rows }));
        }
    });
    Rows { rx }
}

/// A row serialised in at most `budget` bytes: a row that is larger (a command line of
/// megabytes, a block with every port handed out) has its largest arrays and strings cut in
/// half until it fits, and is marked `"truncated": true`.
pub(crate) fn fit(mut row: Value, budget: usize) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(&row).expect("JSON values serialise");
    while bytes.len() > budget {
        let Value::Object(map) = &mut row else {
            return b"null".to_vec();
        };
        let largest = map
            .iter()
            .map(|(k, v)| (serde_json::to_vec(v).map_or(0, |b| b.len()), k.clone()))
            .max();
        let Some((size, key)) = largest else {
            return b"null".to_vec();
        };
        if size <= 16 {
            return b"null".to_vec();
        }
        match map.get_mut(&key) {
            Some(Value::Array(a)) => {
                let keep = a.len() / 2;
                a.truncate(keep);
            }
            Some(Value::String(s)) => {
                let mut keep = s.len() / 2;
                while !s.is_char_boundary(keep) {
                    keep -= 1;
                }
                s.truncate(keep);
                s.push('…');
            }
            Some(v) => *v = Value::Null,
            None => {}
        }
        map.insert("truncated".into(), Value::Bool(true));
        bytes = serde_json::to_vec(&row).expect("JSON values serialise");
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversize_rows_are_cut_to_fit() {
        let row = serde_json::json!({"port": 1, "ports": (0..30_000).collect::<Vec<u32>>(),
            "command": "x".repeat(100_000)});
        let bytes = fit(row, 1000);
        assert!(bytes.len() <= 1000);
        let back: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back["truncated"], true);
        assert_eq!(back["port"], 1);
        let small = serde_json::json!({"port": 2});
        assert_eq!(
            fit(small.clone(), 1000),
            serde_json::to_vec(&small).unwrap()
        );
    }
}
