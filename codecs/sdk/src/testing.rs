//! Drives a [`Codec`] on the host, the way the engine would through the exports: for
//! unit tests and speed measurements of codec crates (`cargo test`).

use crate::frames::encode_batch;
use crate::{Codec, Command, Fatal, Frame, Op, Output};

/// One output record, copied out of the [`Output`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The record kind (`crate::kind`).
    pub kind: u32,
    /// Request or command id, 0 when none.
    pub id: i64,
    /// Channel bytes.
    pub channel: Vec<u8>,
    /// Payload bytes.
    pub payload: Vec<u8>,
}

impl Record {
    /// The payload as text (lossy), for assertions.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// The channel as text (lossy), for assertions.
    pub fn channel_text(&self) -> String {
        String::from_utf8_lossy(&self.channel).into_owned()
    }
}

/// Splits encoded records, checking the framing and the reserved field.
///
/// # Panics
/// On bytes that are not whole, well-formed records (a `DATA_IN_INPUT` record is not
/// well-formed outside a decode's output).
pub fn parse_records(bytes: &[u8]) -> Vec<Record> {
    parse(bytes, None)
}

/// [`parse_records`] of a decode call's output: a `DATA_IN_INPUT` record becomes the
/// `DATA` record it stands for, its payload taken from `input` (the call's frames) as
/// the engine does.
///
/// # Panics
/// As [`parse_records`]; and on a `DATA_IN_INPUT` record pointing outside `input`.
pub fn parse_records_of(bytes: &[u8], input: &[u8]) -> Vec<Record> {
    parse(bytes, Some(input))
}

fn parse(bytes: &[u8], input: Option<&[u8]>) -> Vec<Record> {
    let mut records = Vec::new();
    let mut at = 0;
    let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    while at < bytes.len() {
        assert!(bytes.len() - at >= 24, "record header cut short at {at}");
        let kind = word(at);
        let channel_len = word(at + 4) as usize;
        let payload_len = word(at + 8) as usize;
        let channel_start = at + 24;
        let payload_start = channel_start + channel_len;
        let id = i64::from_le_bytes(bytes[at + 16..at + 24].try_into().expect("8 bytes"));
        if kind == crate::kind::DATA_IN_INPUT {
            let input = input.expect("DATA_IN_INPUT only in a decode's output");
            assert_eq!(
                payload_len, 0,
                "DATA_IN_INPUT record at {at} carries payload bytes"
            );
            assert!(
                payload_start <= bytes.len(),
                "record at {at} runs past the output"
            );
            let offset = usize::try_from(id).expect("DATA_IN_INPUT offset is not negative");
            let payload = offset
                .checked_add(word(at + 12) as usize)
                .and_then(|end| input.get(offset..end))
                .expect("DATA_IN_INPUT points into the input");
            records.push(Record {
                kind: crate::kind::DATA,
                id: 0,
                channel: bytes[channel_start..payload_start].to_vec(),
                payload: payload.to_vec(),
            });
            at = payload_start;
            continue;
        }
        assert_eq!(word(at + 12), 0, "reserved field of the record at {at}");
        let end = payload_start + payload_len;
        assert!(end <= bytes.len(), "record at {at} runs past the output");
        records.push(Record {
            kind,
            id,
            channel: bytes[channel_start..payload_start].to_vec(),
            payload: bytes[payload_start..end].to_vec(),
        });
        at = end;
    }
    records
}

/// One codec instance with the engine's calling convention: output cleared before each
/// call, decode input laid out as the ABI's frame batch.
pub struct Harness<C> {
    /// The codec under test.
    pub codec: C,
    output: Output,
    batch: Vec<u8>,
}

impl<C: Codec> Harness<C> {
    /// `wirepool_init` after an engine that understands every extension this SDK
    /// knows ([`crate::feature::ALL`]); returns the harness and init's records.
    pub fn init(config: &[u8], token: &[u8]) -> Result<(Harness<C>, Vec<Record>), Fatal> {
        Self::init_with_features(crate::feature::ALL, config, token)
    }

    /// `wirepool_init` after `wirepool_engine_features(features)` (0: an engine that
    /// predates the export).
    pub fn init_with_features(
        features: i32,
        config: &[u8],
        token: &[u8],
    ) -> Result<(Harness<C>, Vec<Record>), Fatal> {
        let mut output = Output::new();
        output.set_engine_features(features);
        let codec = C::init(config, token, &mut output)?;
        let records = parse_records(output.as_bytes());
        Ok((
            Harness {
                codec,
                output,
                batch: Vec::new(),
            },
            records,
        ))
    }

    /// The last call's output as the engine receives it (a decode's `DATA_IN_INPUT`
    /// records unresolved).
    pub fn output_bytes(&self) -> &[u8] {
        self.output.as_bytes()
    }

    /// `wirepool_open`.
    pub fn open(&mut self) -> Result<Vec<Record>, Fatal> {
        self.output.clear();
        self.codec.open(&mut self.output)?;
        Ok(parse_records(self.output.as_bytes()))
    }

    /// `wirepool_decode` of text frames.
    pub fn decode_text(&mut self, frames: &[&[u8]]) -> Result<Vec<Record>, Fatal> {
        self.decode(frames.iter().map(|body| Frame {
            body,
            binary: false,
        }))
    }

    /// `wirepool_decode` of any frames.
    pub fn decode<'f>(
        &mut self,
        frames: impl IntoIterator<Item = Frame<'f>>,
    ) -> Result<Vec<Record>, Fatal> {
        self.decode_raw(frames)?;
        Ok(parse_records_of(self.output.as_bytes(), &self.batch))
    }

    /// `wirepool_decode`, leaving the encoded records in place (for speed tests);
    /// returns their total length in bytes.
    pub fn decode_raw<'f>(
        &mut self,
        frames: impl IntoIterator<Item = Frame<'f>>,
    ) -> Result<usize, Fatal> {
        let count = encode_batch(frames, &mut self.batch);
        self.decode_batch(count)
    }

    /// Lays out frames once for repeated [`Harness::decode_batch`] calls.
    pub fn set_batch<'f>(&mut self, frames: impl IntoIterator<Item = Frame<'f>>) -> i32 {
        encode_batch(frames, &mut self.batch)
    }

    /// `wirepool_decode` of the batch laid out last; returns the output's length.
    pub fn decode_batch(&mut self, count: i32) -> Result<usize, Fatal> {
        self.output.clear();
        crate::frames::decode_batch(&mut self.codec, &self.batch, count, &mut self.output)?;
        Ok(self.output.as_bytes().len())
    }

    /// `wirepool_encode`.
    pub fn encode(
        &mut self,
        op: Op,
        id: i64,
        channel: &[u8],
        payload: &[u8],
    ) -> Result<Vec<Record>, Fatal> {
        self.output.clear();
        let command = Command {
            op,
            id,
            channel,
            payload,
        };
        self.codec.encode(command, &mut self.output)?;
        Ok(parse_records(self.output.as_bytes()))
    }

    /// `wirepool_tick`.
    pub fn tick(&mut self, now_ms: i64) -> Result<Vec<Record>, Fatal> {
        self.output.clear();
        self.codec.tick(now_ms, &mut self.output)?;
        Ok(parse_records(self.output.as_bytes()))
    }
}
