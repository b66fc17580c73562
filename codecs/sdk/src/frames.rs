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

/// Iterator over the frames of one batch. [`Frames::parse`] checks the whole layout
/// up front. The runtime's decode reads each frame's header only as the codec reaches
/// it ([`decode_batch`]): a layout that turns out not to hold the frames it claims
/// then ends the iteration early, and the call fails once the codec returns. (The
/// layout is the engine's: a broken one is an engine bug.)
#[derive(Debug, Clone)]
pub struct Frames<'a> {
    rest: &'a [u8],
    remaining: usize,
    count: usize,
    broken: Option<&'a Cell<Option<Break>>>,
}

/// How a layout read lazily broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Break {
    /// Frame `index` (from 0) runs past the end of the bytes given.
    PastEnd { index: usize },
    /// Bytes follow the last frame.
    LeftOver { bytes: usize },
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
                None => return Err(past_end(index, count, batch.len())),
            }
        }
        if at != batch.len() {
            return Err(left_over(batch.len() - at, count, batch.len()));
        }
        Ok(Frames {
            rest: batch,
            remaining: count,
            count,
            broken: None,
        })
    }

    /// The frames of `batch`, each frame's bounds checked as the iteration reaches it
    /// (a pass ahead costs a dependent load per frame, over a batch larger than the
    /// first-level cache): `broken` records the first break. Up front, only what costs
    /// nothing: the count is not negative, there are at least 8 bytes per frame, and no
    /// frames means no bytes.
    fn lazy(
        batch: &'a [u8],
        count: i32,
        broken: &'a Cell<Option<Break>>,
    ) -> Result<Frames<'a>, Fatal> {
        let Ok(count) = usize::try_from(count) else {
            return Err(Fatal::new("negative frame count"));
        };
        if count
            .checked_mul(HEADER_LEN)
            .is_none_or(|least| least > batch.len())
        {
            return Err(Fatal::new(format!(
                "decode input: {count} frames cannot fit in the {} bytes given (8 bytes of \
                 header each)",
                batch.len()
            )));
        }
        if count == 0 && !batch.is_empty() {
            return Err(left_over(batch.len(), 0, batch.len()));
        }
        Ok(Frames {
            rest: batch,
            remaining: count,
            count,
            broken: Some(broken),
        })
    }

    /// Frames not yet iterated (as the engine counted them: a broken layout ends the
    /// iteration before).
    pub fn len(&self) -> usize {
        self.remaining
    }

    /// No frames left.
    pub fn is_empty(&self) -> bool {
        self.remaining == 0
    }

    /// Records `how` the layout broke, unless an earlier break is on record.
    fn note(&self, how: Break) {
        if let Some(broken) = self.broken {
            if broken.get().is_none() {
                broken.set(Some(how));
            }
        }
    }

    /// Ends the iteration at a frame the layout does not hold.
    fn break_off(&mut self, how: Break) -> Option<Frame<'a>> {
        self.remaining = 0;
        self.note(how);
        None
    }
}

fn past_end(index: usize, count: usize, len: usize) -> Fatal {
    Fatal::new(format!(
        "decode input: frame {index} of {count} runs past the {len} bytes given"
    ))
}

fn left_over(bytes: usize, count: usize, len: usize) -> Fatal {
    Fatal::new(format!(
        "decode input: {bytes} of the {len} bytes given are left after the {count} frames"
    ))
}

/// `codec.decode` of the `count` frames laid out in `batch`, the way the runtime's
/// `wirepool_decode` runs it (and the test harness, so that its tests take the same
/// path): frames checked as they are reached, and a layout found broken fails the
/// call, whatever the codec made of the frames before. Frames a codec does not
/// iterate are not checked.
pub(crate) fn decode_batch<C: crate::Codec>(
    codec: &mut C,
    batch: &[u8],
    count: i32,
    out: &mut crate::Output,
) -> Result<(), Fatal> {
    let broken = Cell::new(None);
    let frames = Frames::lazy(batch, count, &broken)?;
    let count = frames.count;
    out.set_input(batch);
    let decoded = codec.decode(frames, out);
    out.set_input(&[]);
    decoded?;
    match broken.get() {
        None => Ok(()),
        Some(Break::PastEnd { index }) => Err(past_end(index, count, batch.len())),
        Some(Break::LeftOver { bytes }) => Err(left_over(bytes, count, batch.len())),
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Frame<'a>;

    fn next(&mut self) -> Option<Frame<'a>> {
        if self.remaining == 0 {
            return None;
        }
        let rest = self.rest;
        let index = self.count - self.remaining;
        let Some(header) = rest.get(..HEADER_LEN) else {
            return self.break_off(Break::PastEnd { index });
        };
        let len = read_u32(&header[0..4]) as usize;
        let flags = read_u32(&header[4..8]);
        let after = &rest[HEADER_LEN..];
        if len > after.len() {
            return self.break_off(Break::PastEnd { index });
        }
        let (body, tail) = after.split_at(len);
        self.rest = tail;
        self.remaining -= 1;
        if self.remaining == 0 && !tail.is_empty() {
            self.note(Break::LeftOver { bytes: tail.len() });
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

    /// A codec that collects what it is given.
    struct Collect(Vec<(Vec<u8>, bool)>);

    impl crate::Codec for Collect {
        fn init(_: &[u8], _: &[u8], _: &mut crate::Output) -> Result<Collect, Fatal> {
            Ok(Collect(Vec::new()))
        }

        fn open(&mut self, _: &mut crate::Output) -> Result<(), Fatal> {
            Ok(())
        }

        fn decode(&mut self, frames: Frames<'_>, _: &mut crate::Output) -> Result<(), Fatal> {
            self.0
                .extend(frames.map(|frame| (frame.body.to_vec(), frame.binary)));
            Ok(())
        }

        fn encode(&mut self, _: crate::Command<'_>, _: &mut crate::Output) -> Result<(), Fatal> {
            Ok(())
        }
    }

    #[test]
    fn a_lazily_read_layout_that_does_not_hold_its_frames_fails_the_call() {
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
        let run = |bytes: &[u8], count: i32| {
            let mut codec = Collect(Vec::new());
            let result = decode_batch(&mut codec, bytes, count, &mut crate::Output::new());
            (codec.0.len(), result.map_err(|fatal| fatal.0))
        };
        assert_eq!(run(&batch, count), (2, Ok(())), "a good layout");
        let (seen, result) = run(&batch, count + 1);
        assert_eq!(seen, 2, "the frames before the break are decoded");
        let err = result.expect_err("one frame too many");
        assert!(
            err.contains("frame 2 of 3 runs past the 27 bytes given"),
            "{err}"
        );
        let err = run(&batch, count - 1).1.expect_err("bytes left over");
        assert!(
            err.contains("14 of the 27 bytes given are left after the 1 frames"),
            "{err}"
        );
        let err = run(&batch[..batch.len() - 1], count)
            .1
            .expect_err("body cut short");
        assert!(err.contains("frame 1 of 2 runs past"), "{err}");
        let err = run(&batch[..5 + 8 + 4], count)
            .1
            .expect_err("header cut short");
        assert!(err.contains("frame 1 of 2 runs past"), "{err}");
        // Checked before the codec runs: no frames with bytes, too many frames for
        // the bytes (a bogus count must not make a codec reserve for it), a negative
        // count.
        let err = run(&batch, 0).1.expect_err("no frames, bytes given");
        assert!(err.contains("27 of the 27 bytes given are left"), "{err}");
        assert_eq!(run(&[], 0), (0, Ok(())));
        let (seen, result) = run(&batch, i32::MAX);
        assert_eq!(seen, 0);
        assert!(result.expect_err("too many").contains("cannot fit"));
        assert!(run(&batch, -1)
            .1
            .expect_err("negative")
            .contains("negative"));
    }
}
