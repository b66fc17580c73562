//! The inbound frames of one `wirepool_decode` call: `[u32 len][u32 flags][body]`
//! back to back, `count` times (`docs/codec-abi.md`, "Inbound frames").

use crate::Fatal;

const HEADER_LEN: usize = 8;
const FLAG_BINARY: u32 = 1;

/// One inbound WebSocket frame, borrowing the input buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The frame body.
    pub body: &'a [u8],
    /// A binary frame (else text).
    pub binary: bool,
}

/// Iterator over the frames of one batch, whose framing was checked up front.
#[derive(Debug, Clone)]
pub struct Frames<'a> {
    rest: &'a [u8],
    remaining: usize,
}

fn read_u32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

impl<'a> Frames<'a> {
    /// Checks that `batch` holds exactly `count` frames. A mismatch is an engine bug,
    /// hence [`Fatal`].
    pub fn parse(batch: &'a [u8], count: i32) -> Result<Frames<'a>, Fatal> {
        let Ok(count) = usize::try_from(count) else {
            return Err(Fatal::new("negative frame count"));
        };
        let mut at = 0usize;
        for index in 0..count {
            let body_start = at + HEADER_LEN;
            let end = batch
                .get(at..body_start)
                .and_then(|header| body_start.checked_add(read_u32(header) as usize))
                .filter(|end| *end <= batch.len());
            match end {
                Some(end) => at = end,
                None => {
                    return Err(Fatal::new(format!(
                        "decode input: frame {index} of {count} runs past the {} bytes given",
                        batch.len()
                    )))
                }
            }
        }
        if at != batch.len() {
            return Err(Fatal::new(format!(
                "decode input: {count} frames end at byte {at}, but {} bytes were given",
                batch.len()
            )));
        }
        Ok(Frames {
            rest: batch,
            remaining: count,
        })
    }

    /// Frames not yet iterated.
    pub fn len(&self) -> usize {
        self.remaining
    }

    /// No frames left.
    pub fn is_empty(&self) -> bool {
        self.remaining == 0
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Frame<'a>;

    fn next(&mut self) -> Option<Frame<'a>> {
        if self.remaining == 0 {
            return None;
        }
        let rest = self.rest;
        // `parse` checked every header and length, so these slices are in bounds.
        let len = read_u32(&rest[0..4]) as usize;
        let flags = read_u32(&rest[4..8]);
        let (body, tail) = rest[HEADER_LEN..].split_at(len);
        self.rest = tail;
        self.remaining -= 1;
        Some(Frame {
            body,
            binary: flags & FLAG_BINARY != 0,
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for Frames<'_> {}

/// Lays frames out the way the engine does; for tests and the host harness.
#[cfg(not(target_arch = "wasm32"))]
pub fn encode_batch<'f>(frames: impl IntoIterator<Item = Frame<'f>>, batch: &mut Vec<u8>) -> i32 {
    batch.clear();
    let mut count = 0;
    for frame in frames {
        batch.extend_from_slice(&(frame.body.len() as u32).to_le_bytes());
        batch.extend_from_slice(&u32::from(frame.binary).to_le_bytes());
        batch.extend_from_slice(frame.body);
        count += 1;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iterates_text_and_binary_frames() {
        let mut batch = Vec::new();
        let frames = [
            Frame {
                body: b"hello",
                binary: false,
            },
            Frame {
                body: b"",
                binary: true,
            },
            Frame {
                body: b"\x00\xff",
                binary: true,
            },
        ];
        let count = encode_batch(frames, &mut batch);
        let parsed: Vec<Frame> = Frames::parse(&batch, count).expect("valid batch").collect();
        assert_eq!(parsed, frames);
    }

    #[test]
    fn rejects_a_count_that_does_not_match_the_bytes() {
        let mut batch = Vec::new();
        let count = encode_batch(
            [Frame {
                body: b"abc",
                binary: false,
            }],
            &mut batch,
        );
        assert!(
            Frames::parse(&batch, count + 1).is_err(),
            "one frame too many"
        );
        assert!(Frames::parse(&batch, 0).is_err(), "bytes left over");
        assert!(
            Frames::parse(&batch[..batch.len() - 1], count).is_err(),
            "body cut short"
        );
        assert!(Frames::parse(&batch, -1).is_err(), "negative count");
    }
}
