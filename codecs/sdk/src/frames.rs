//! The inbound frames of one `wirepool_decode` call: `[u32 len][u32 flags][body]`
//! back to back, `count` times (`docs/codec-abi.md`, "Inbound frames").

use core::cell::Cell;

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

/// Iterator over the frames of one batch. Every frame's bounds are checked as it is
/// reached: a layout that does not hold the frames it claims ends the iteration early
/// (and, for [`Frames::lazy`], says so through its flag); [`Frames::parse`] checks the
/// whole layout up front instead.
#[derive(Debug, Clone)]
pub struct Frames<'a> {
    rest: &'a [u8],
    remaining: usize,
    broken: Option<&'a Cell<bool>>,
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
            broken: None,
        })
    }

    /// The frames of `batch` without a pass over the layout first: the runtime's
    /// decode, where a frame's header is read once, as the codec reaches it (a pass
    /// ahead costs a dependent load per frame over a batch larger than the first-level
    /// cache). `broken` is set when a frame runs past the end of `batch`, or bytes
    /// follow the last one.
    pub(crate) fn lazy(
        batch: &'a [u8],
        count: i32,
        broken: &'a Cell<bool>,
    ) -> Result<Frames<'a>, Fatal> {
        let Ok(count) = usize::try_from(count) else {
            return Err(Fatal::new("negative frame count"));
        };
        Ok(Frames {
            rest: batch,
            remaining: count,
            broken: Some(broken),
        })
    }

    fn break_off(&mut self) -> Option<Frame<'a>> {
        self.remaining = 0;
        if let Some(broken) = self.broken {
            broken.set(true);
        }
        None
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
        let Some(header) = rest.get(..HEADER_LEN) else {
            return self.break_off();
        };
        let len = read_u32(&header[0..4]) as usize;
        let flags = read_u32(&header[4..8]);
        let after = &rest[HEADER_LEN..];
        if len > after.len() {
            return self.break_off();
        }
        let (body, tail) = after.split_at(len);
        self.rest = tail;
        self.remaining -= 1;
        if self.remaining == 0 && !tail.is_empty() {
            if let Some(broken) = self.broken {
                broken.set(true);
            }
        }
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

    #[test]
    fn lazy_frames_flag_a_layout_that_does_not_hold_them() {
        let mut batch = Vec::new();
        let frames = [
            Frame {
                body: b"first",
                binary: false,
            },
            Frame {
                body: b"second",
                binary: true,
            },
        ];
        let count = encode_batch(frames, &mut batch);
        let read = |bytes: &[u8], count: i32| {
            let broken = Cell::new(false);
            let frames: Vec<Frame> = Frames::lazy(bytes, count, &broken)
                .expect("count is not negative")
                .collect();
            (frames.len(), broken.get())
        };
        assert_eq!(read(&batch, count), (2, false), "a good layout");
        assert_eq!(read(&batch, count + 1), (2, true), "one frame too many");
        assert_eq!(read(&batch, count - 1), (1, true), "bytes left over");
        assert_eq!(
            read(&batch[..batch.len() - 1], count),
            (1, true),
            "body cut short"
        );
        assert_eq!(
            read(&batch[..5 + 8 + 4], count),
            (1, true),
            "header cut short"
        );
        assert!(Frames::lazy(&batch, -1, &Cell::new(false)).is_err());
    }
}
