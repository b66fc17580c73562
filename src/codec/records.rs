//! Output records of ABI v1: parsing the codec's output without copying it.

/// Record kinds (`docs/codec-abi.md`, "Output records").
pub(crate) mod kind {
    pub const SEND_TEXT: u32 = 1;
    pub const SEND_BINARY: u32 = 2;
    pub const READY: u32 = 3;
    pub const DATA: u32 = 4;
    pub const RESPONSE: u32 = 5;
    pub const REQUEST_ERROR: u32 = 6;
    pub const SUBSCRIBED: u32 = 7;
    pub const UNSUBSCRIBED: u32 = 8;
    pub const ERROR: u32 = 9;
    pub const HEARTBEAT: u32 = 10;
    pub const SHARED: u32 = 11;
    pub const SEQUENCE_GAP: u32 = 12;
    pub const AUTH_FAILED: u32 = 13;
    pub const MALFORMED: u32 = 14;
    pub const SUBSCRIBE_ERROR: u32 = 15;
    pub const PASSTHROUGH: u32 = 16;
    pub const DATA_IN_INPUT: u32 = 17;
    pub const RECONNECT: u32 = 18;
}

/// Outbound operations (`docs/codec-abi.md`, "Outbound commands").
pub(crate) mod op {
    pub const SUBSCRIBE: i32 = 1;
    pub const UNSUBSCRIBE: i32 = 2;
    pub const REQUEST: i32 = 3;
    pub const HEARTBEAT: i32 = 4;
    pub const CANCEL: i32 = 5;
}

const HEADER_LEN: usize = 24;

/// One output record, borrowing the codec's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Record<'a> {
    pub kind: u32,
    pub id: i64,
    pub channel: &'a [u8],
    pub payload: &'a [u8],
}

/// The records of one call. Each record's framing is checked as the iteration reaches
/// it (a pass ahead would cost a dependent load per record over an output larger than
/// the first-level cache); a record that runs past the end ends the iteration with an
/// error, after the records before it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Records<'a> {
    bytes: &'a [u8],
    input: Option<&'a [u8]>,
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

impl<'a> Records<'a> {
    /// The records in `bytes`, to be checked as they are read; `input` is a decode
    /// call's input, which `DATA_IN_INPUT` records point into (`None` for the other
    /// calls, whose output may hold none).
    pub fn new(bytes: &'a [u8], input: Option<&'a [u8]>) -> Records<'a> {
        Records { bytes, input }
    }

    /// Iterates the records.
    pub fn iter(&self) -> RecordIter<'a> {
        RecordIter {
            bytes: self.bytes,
            input: self.input,
            at: 0,
        }
    }

    /// Number of records, or the first framing error.
    pub fn count(&self) -> Result<usize, String> {
        self.iter()
            .try_fold(0, |count, record| record.map(|_| count + 1))
    }
}

/// Iterator over [`Records`]: a record, or the error that ends the iteration.
pub(crate) struct RecordIter<'a> {
    bytes: &'a [u8],
    input: Option<&'a [u8]>,
    at: usize,
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = Result<Record<'a>, String>;

    fn next(&mut self) -> Option<Self::Item> {
        let bytes = self.bytes;
        let at = self.at;
        if at >= bytes.len() {
            return None;
        }
        // Whatever happens below, this is the last look at a broken record.
        self.at = bytes.len();
        if bytes.len() - at < HEADER_LEN {
            return Some(Err(format!(
                "output record at offset {at} is cut short ({} bytes, header needs {HEADER_LEN})",
                bytes.len() - at
            )));
        }
        let kind = read_u32(bytes, at);
        let channel_len = read_u32(bytes, at + 4) as usize;
        let payload_len = read_u32(bytes, at + 8) as usize;
        let channel_start = at + HEADER_LEN;
        let payload_start = channel_start.saturating_add(channel_len);
        let mut id = [0u8; 8];
        id.copy_from_slice(&bytes[at + 16..at + 24]);
        let id = i64::from_le_bytes(id);
        let end = payload_start.saturating_add(payload_len);
        if end > bytes.len() {
            return Some(Err(format!(
                "output record at offset {at} claims {channel_len} + {payload_len} bytes, \
                 past the end of the output ({} bytes)",
                bytes.len()
            )));
        }
        let channel = &bytes[channel_start..payload_start];
        if kind == kind::DATA_IN_INPUT {
            let message_len = read_u32(bytes, at + 12) as usize;
            let record = self.in_input(at, id, channel, payload_len, message_len);
            if record.is_ok() {
                self.at = end;
            }
            return Some(record);
        }
        self.at = end;
        Some(Ok(Record {
            kind,
            id,
            channel,
            payload: &bytes[payload_start..end],
        }))
    }
}

impl<'a> RecordIter<'a> {
    /// The `DATA` record a `DATA_IN_INPUT` record at output offset `at` stands for: its
    /// message is `message_len` bytes of the call's input at offset `offset`.
    fn in_input(
        &self,
        at: usize,
        offset: i64,
        channel: &'a [u8],
        payload_len: usize,
        message_len: usize,
    ) -> Result<Record<'a>, String> {
        let Some(input) = self.input else {
            return Err(format!(
                "output record at offset {at} is DATA_IN_INPUT, which only wirepool_decode \
                 may emit"
            ));
        };
        if payload_len != 0 {
            return Err(format!(
                "DATA_IN_INPUT record at output offset {at} carries {payload_len} payload \
                 bytes (its message is in the input; payload_len must be 0)"
            ));
        }
        let payload = usize::try_from(offset)
            .ok()
            .and_then(|start| input.get(start..start.checked_add(message_len)?))
            .ok_or_else(|| {
                format!(
                    "DATA_IN_INPUT record at output offset {at} points at {message_len} \
                     byte(s) from input offset {offset}, past the call's input ({} bytes)",
                    input.len()
                )
            })?;
        Ok(Record {
            kind: kind::DATA,
            id: 0,
            channel,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The table reader the SDK's own check uses too.
    include!("../../codecs/sdk/src/abi_table.rs");

    const DOC: &str = include_str!("../../docs/codec-abi.md");

    #[test]
    fn record_kinds_and_ops_match_the_documented_abi() {
        let kinds = record_kinds!(kind);
        assert_eq!(documented(DOC, "Output records"), kinds);
        let ops = [
            (op::SUBSCRIBE, "SUBSCRIBE"),
            (op::UNSUBSCRIBE, "UNSUBSCRIBE"),
            (op::REQUEST, "REQUEST"),
            (op::HEARTBEAT, "HEARTBEAT"),
            (op::CANCEL, "CANCEL"),
        ]
        .map(|(code, name)| (i64::from(code), name.to_string()));
        assert_eq!(documented(DOC, "Outbound commands"), ops);
    }

    #[test]
    fn engine_feature_bits_match_the_documented_abi() {
        use crate::codec::feature;
        assert_eq!(
            documented(DOC, "Engine features"),
            engine_features!(feature)
        );
    }

    fn record(kind: u32, id: i64, channel: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&(channel.len() as u32).to_le_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(channel);
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn parses_consecutive_records() {
        let mut bytes = record(kind::DATA, 0, b"ticker.1", b"{\"p\":1}");
        bytes.extend(record(kind::RESPONSE, 42, b"", b"ok"));
        let records = Records::new(&bytes, None);
        assert_eq!(records.count(), Ok(2));
        let all: Vec<_> = records
            .iter()
            .map(|record| record.expect("well formed"))
            .collect();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].channel, b"ticker.1");
        assert_eq!(all[1].id, 42);
        assert_eq!(all[1].payload, b"ok");
    }

    #[test]
    fn a_broken_record_ends_the_records_after_those_before_it() {
        let good = record(kind::DATA, 0, b"a", b"b");
        let mut bytes = good.clone();
        bytes.extend(record(kind::DATA, 0, b"c", b"d"));
        bytes.truncate(bytes.len() - 1);
        let mut records = Records::new(&bytes, None).iter();
        assert_eq!(
            records.next().map(|record| record.map(|r| r.payload)),
            Some(Ok(&b"b"[..]))
        );
        let err = records.next().expect("an error").expect_err("cut short");
        assert!(
            err.contains("offset 26") && err.contains("past the end"),
            "{err}"
        );
        assert!(records.next().is_none(), "nothing after the error");
        assert!(Records::new(&bytes, None).count().is_err());

        let err = Records::new(&[1, 2, 3], None)
            .count()
            .expect_err("short header");
        assert!(err.contains("cut short"), "{err}");
        // A length near 2^32 does not wrap around.
        let mut huge = record(kind::DATA, 0, b"", b"x");
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = Records::new(&huge, None).count().expect_err("too long");
        assert!(err.contains("4294967295"), "{err}");
        assert_eq!(Records::new(&[], None).count(), Ok(0));
    }

    /// A `DATA_IN_INPUT` record: its header (the message's length at 12, no payload)
    /// and channel.
    fn data_in_input(channel: &[u8], offset: i64, len: u32) -> Vec<u8> {
        let mut out = record(kind::DATA_IN_INPUT, offset, channel, b"");
        out[12..16].copy_from_slice(&len.to_le_bytes());
        out
    }

    #[test]
    fn data_in_input_takes_its_payload_from_the_input_and_frames_like_any_record() {
        let input = b"\x05\0\0\0\0\0\0\0hello";
        let mut bytes = data_in_input(b"t", 8, 5);
        bytes.extend(data_in_input(b"u", 9, 0));
        bytes.extend(record(kind::RESPONSE, 42, b"", b"ok"));
        let all: Vec<_> = Records::new(&bytes, Some(&input[..]))
            .iter()
            .map(|record| record.expect("well formed"))
            .collect();
        assert_eq!(
            all,
            [
                Record {
                    kind: kind::DATA,
                    id: 0,
                    channel: b"t",
                    payload: b"hello"
                },
                Record {
                    kind: kind::DATA,
                    id: 0,
                    channel: b"u",
                    payload: b""
                },
                Record {
                    kind: kind::RESPONSE,
                    id: 42,
                    channel: b"",
                    payload: b"ok"
                },
            ]
        );
        // The payload's last byte is the input's last.
        let bytes = data_in_input(b"t", 12, 1);
        let last = Records::new(&bytes, Some(&input[..])).iter().next();
        assert_eq!(
            last.and_then(Result::ok).map(|r| r.payload),
            Some(&b"o"[..])
        );
    }

    #[test]
    fn data_in_input_outside_the_input_or_outside_decode_is_broken_output() {
        let input = [7u8; 16];
        let broken = |bytes: &[u8], input: Option<&[u8]>| {
            let mut records = Records::new(bytes, input).iter();
            assert!(records.next().expect("the good record").is_ok());
            let err = records.next().expect("an error").expect_err("broken");
            assert!(records.next().is_none(), "nothing after the error");
            err
        };
        let good = record(kind::DATA, 0, b"a", b"b");
        for (offset, len) in [(16, 1), (10, 7), (-1, 1), (i64::MAX, 1), (0, u32::MAX)] {
            let mut bytes = good.clone();
            bytes.extend(data_in_input(b"t", offset, len));
            let err = broken(&bytes, Some(&input));
            assert!(
                err.contains(&format!(
                    "DATA_IN_INPUT record at output offset 26 points at {len} byte(s) from \
                     input offset {offset}, past the call's input (16 bytes)"
                )),
                "{err}"
            );
        }
        let mut bytes = good.clone();
        bytes.extend(data_in_input(b"t", 0, 1));
        let err = broken(&bytes, None);
        assert!(err.contains("only wirepool_decode may emit"), "{err}");
        // The channel itself must fit the output.
        let mut bytes = good.clone();
        let mut cut = data_in_input(b"channel", 0, 1);
        cut.truncate(cut.len() - 1);
        bytes.extend(cut);
        let err = broken(&bytes, Some(&input));
        assert!(err.contains("claims 7 + 0 bytes, past the end"), "{err}");
        // Payload bytes of its own are not allowed: the message is in the input.
        let mut bytes = good.clone();
        let mut carrying = data_in_input(b"t", 0, 1);
        carrying[8..12].copy_from_slice(&1u32.to_le_bytes());
        carrying.push(b'x');
        bytes.extend(carrying);
        let err = broken(&bytes, Some(&input));
        assert!(err.contains("carries 1 payload bytes"), "{err}");
    }
}
