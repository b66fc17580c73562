//! A validating JSON scanner that allocates nothing.
//!
//! [`scan`] checks that a byte slice is exactly one JSON value (RFC 8259: UTF-8 text,
//! objects, arrays, strings with every escape, numbers, `true`/`false`/`null`,
//! whitespace around, nothing after) in one pass, and on the way picks out the raw
//! text of the top-level object's members the caller names. Nothing is decoded or
//! copied: a [`Value`] borrows its bytes from the input, and a string is unescaped
//! (into a caller's scratch buffer) only when asked and only when it has escapes.
//!
//! The scanner is iterative: nesting is tracked in a 128-bit stack (two 64-bit words:
//! 128-bit shifts would call helper functions in wasm32 code), so hostile input
//! cannot overflow the call stack; containers nested deeper than [`MAX_DEPTH`] are an
//! error.
//!
//! Choices where RFC 8259 leaves room: a duplicated member name is allowed and the last
//! one wins (as in JavaScript); `\uXXXX` escapes naming a lone surrogate are accepted
//! (the grammar allows them) and unescape to U+FFFD; a byte-order mark is an error.

/// The deepest nesting of objects and arrays that [`scan`] accepts.
pub const MAX_DEPTH: usize = 128;

/// The kind of a JSON value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `{...}`
    Object,
    /// `[...]`
    Array,
    /// `"..."`
    String,
    /// `-1.5e3` and the like
    Number,
    /// `true`
    True,
    /// `false`
    False,
    /// `null`
    Null,
}

/// Why a text is not one JSON value, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonError {
    /// Byte offset of the problem in the input.
    pub offset: usize,
    /// What is wrong, in a few words.
    pub reason: &'static str,
}

impl core::fmt::Display for JsonError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} at byte {}", self.reason, self.offset)
    }
}

/// A validated JSON value, borrowing its raw text from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Value<'a> {
    raw: &'a [u8],
    kind: Kind,
    escaped: bool,
}

impl<'a> Value<'a> {
    /// The value's text exactly as it stood in the input (strings with their quotes).
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// The value's kind.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The contents of a string without escapes, borrowed from the input; `None` for
    /// other kinds and for strings that need unescaping (see [`Value::string`]).
    pub fn plain_str(&self) -> Option<&'a [u8]> {
        if self.kind == Kind::String && !self.escaped {
            Some(&self.raw[1..self.raw.len() - 1])
        } else {
            None
        }
    }

    /// The contents of a string as UTF-8: borrowed from the input when it has no
    /// escapes, else unescaped into `scratch` (cleared first). `None` if not a string.
    pub fn string<'s>(&self, scratch: &'s mut Vec<u8>) -> Option<&'s [u8]>
    where
        'a: 's,
    {
        if self.kind != Kind::String {
            return None;
        }
        let inner = &self.raw[1..self.raw.len() - 1];
        if !self.escaped {
            return Some(inner);
        }
        scratch.clear();
        unescape(inner, |piece| {
            scratch.extend_from_slice(piece);
            true
        });
        Some(scratch)
    }

    /// An integral number that fits in `i64` (no fraction, no exponent); `None`
    /// otherwise.
    pub fn as_i64(&self) -> Option<i64> {
        if self.kind != Kind::Number {
            return None;
        }
        let (negative, digits) = match self.raw.split_first() {
            Some((b'-', rest)) => (true, rest),
            _ => (false, self.raw),
        };
        // Up to 19 decimal digits always fit in a u64, so the loop needs no overflow
        // checks (checked i64 arithmetic pulls 128-bit helpers into wasm32 code, and
        // this runs for every frame with a sequence number).
        if digits.is_empty() || digits.len() > 19 {
            return None;
        }
        let mut value: u64 = 0;
        for &digit in digits {
            let digit = digit.wrapping_sub(b'0');
            if digit > 9 {
                return None;
            }
            value = value * 10 + u64::from(digit);
        }
        if negative {
            (value <= 1 << 63).then(|| (value as i64).wrapping_neg())
        } else {
            i64::try_from(value).ok()
        }
    }

    /// `true` or `false`; `None` for other kinds.
    pub fn as_bool(&self) -> Option<bool> {
        match self.kind {
            Kind::True => Some(true),
            Kind::False => Some(false),
            _ => None,
        }
    }
}

/// Checks that `input` is exactly one JSON value and returns its kind.
///
/// A flat object of scalar members without whitespace or escapes (most market-data
/// payloads) is recognised by a shortcut; anything else goes to the full scanner, from
/// the start, so an input that leaves the shortcut late is read up to twice.
pub fn validate(input: &[u8]) -> Result<Kind, JsonError> {
    if flat_object(input) {
        return Ok(Kind::Object);
    }
    // A copy of the scanner of its own, without the member-capturing code: a smaller
    // function whose values stay in registers (this runs on every data frame).
    scan_inline(input, &[], &mut [])
}

/// Recognises the most common payload of market data quickly: one object without
/// whitespace whose members are scalars (numbers, `true`, `false`, `null`, strings)
/// and whose names and strings hold no escapes, control characters or non-ASCII
/// bytes. `true` only for valid JSON; `false` leaves the decision to the full scanner.
#[inline(always)]
fn flat_object(b: &[u8]) -> bool {
    let n = b.len();
    if n < 2 || b[0] != b'{' || b[n - 1] != b'}' {
        return false;
    }
    if n == 2 {
        return true;
    }
    let mut i = 1;
    loop {
        if b.get(i) != Some(&b'"') {
            return false;
        }
        let end = plain_run_end(b, i + 1);
        if b.get(end..end + 2) != Some(b"\":") {
            return false;
        }
        i = end + 2;
        // Tested in turn, not by a `match`, which cranelift compiles to a jump table:
        // one indirect jump per member (2 % faster in `measure_decode_ns_per_frame`).
        let first = b.get(i).copied().unwrap_or(0);
        let value_end = if first == b'"' {
            let end = plain_run_end(b, i + 1);
            (b.get(end) == Some(&b'"')).then_some(end + 1)
        } else if first.wrapping_sub(b'0') < 10 || first == b'-' {
            number(b, i).ok()
        } else if first == b't' {
            literal(b, i, b"true").ok()
        } else if first == b'f' {
            literal(b, i, b"false").ok()
        } else if first == b'n' {
            literal(b, i, b"null").ok()
        } else {
            None
        };
        let Some(end) = value_end else {
            return false;
        };
        i = end;
        match b.get(i) {
            Some(b',') => i += 1,
            Some(b'}') => return i + 1 == n,
            _ => return false,
        }
    }
}

/// Checks that `input` is exactly one JSON value and returns its kind. When it is an
/// object, `values[i]` receives the member named `keys[i]` (compared after unescaping
/// the member name), or `None` when absent; for other kinds all stay `None`.
///
/// # Panics
/// When `values` is shorter than `keys`.
pub fn scan<'a>(
    input: &'a [u8],
    keys: &[&[u8]],
    values: &mut [Option<Value<'a>>],
) -> Result<Kind, JsonError> {
    scan_inline(input, keys, values)
}

#[inline(always)]
fn scan_inline<'a>(
    input: &'a [u8],
    keys: &[&[u8]],
    values: &mut [Option<Value<'a>>],
) -> Result<Kind, JsonError> {
    let values = &mut values[..keys.len()];
    values.fill(None);
    let b = input;
    // Bit `d` set: the container at depth `d + 1` is an array.
    let mut arrays = [0u64; MAX_DEPTH / 64];
    let mut depth: usize = 0;
    // (key index, value start) of the top-level member being read.
    let mut capture: Option<(usize, usize)> = None;
    let mut i = skip_whitespace(b, 0);
    let top_kind = match b.get(i) {
        Some(b'{') => Kind::Object,
        Some(b'[') => Kind::Array,
        Some(b'"') => Kind::String,
        Some(b't') => Kind::True,
        Some(b'f') => Kind::False,
        Some(b'n') => Kind::Null,
        Some(_) => Kind::Number,
        None => return Err(error(i, "empty input")),
    };

    'value: loop {
        // A value starts at `i`.
        let mut escaped = false;
        match b.get(i) {
            Some(&open @ (b'{' | b'[')) => {
                if depth == MAX_DEPTH {
                    return Err(error(i, "nested deeper than 128 levels"));
                }
                let is_array = open == b'[';
                let (word, bit) = (depth / 64, 1u64 << (depth % 64));
                if is_array {
                    arrays[word] |= bit;
                } else {
                    arrays[word] &= !bit;
                }
                depth += 1;
                i = skip_whitespace(b, i + 1);
                let close = if is_array { b']' } else { b'}' };
                if b.get(i) == Some(&close) {
                    depth -= 1;
                    i += 1;
                } else if is_array {
                    continue 'value;
                } else {
                    i = member_name(b, i, depth, keys, &mut capture)?;
                    continue 'value;
                }
            }
            Some(b'"') => (i, escaped) = string(b, i)?,
            Some(b'-' | b'0'..=b'9') => i = number(b, i)?,
            Some(b't') => i = literal(b, i, b"true")?,
            Some(b'f') => i = literal(b, i, b"false")?,
            Some(b'n') => i = literal(b, i, b"null")?,
            Some(_) => return Err(error(i, "expected a value")),
            None => return Err(error(i, "unexpected end of input")),
        }

        // A value (maybe a whole container) ended just before `i`.
        loop {
            if depth == 1 {
                if let Some((key, start)) = capture.take() {
                    values[key] = Some(Value {
                        raw: &b[start..i],
                        kind: kind_at(b[start]),
                        escaped: escaped && b[start] == b'"',
                    });
                }
            }
            i = skip_whitespace(b, i);
            if depth == 0 {
                return if i == b.len() {
                    Ok(top_kind)
                } else {
                    Err(error(i, "unexpected data after the value"))
                };
            }
            let in_array = arrays[(depth - 1) / 64] >> ((depth - 1) % 64) & 1 == 1;
            match (b.get(i), in_array) {
                (Some(b','), true) => {
                    i = skip_whitespace(b, i + 1);
                    continue 'value;
                }
                (Some(b','), false) => {
                    i = skip_whitespace(b, i + 1);
                    i = member_name(b, i, depth, keys, &mut capture)?;
                    continue 'value;
                }
                (Some(b']'), true) | (Some(b'}'), false) => {
                    depth -= 1;
                    i += 1;
                }
                (Some(_), true) => return Err(error(i, "expected ',' or ']'")),
                (Some(_), false) => return Err(error(i, "expected ',' or '}'")),
                (None, _) => return Err(error(i, "unexpected end of input")),
            }
        }
    }
}

/// Calls `sink` with the unescaped pieces of a validated string body (without quotes)
/// until it returns `false`.
pub fn unescape(inner: &[u8], mut sink: impl FnMut(&[u8]) -> bool) {
    let mut i = 0;
    while i < inner.len() {
        let run_end = inner[i..]
            .iter()
            .position(|&byte| byte == b'\\')
            .map_or(inner.len(), |at| i + at);
        if run_end > i && !sink(&inner[i..run_end]) {
            return;
        }
        i = run_end;
        if i >= inner.len() {
            return;
        }
        // A validated escape: `\` + one of "\/bfnrt, or `\uXXXX`.
        let simple: &[u8] = match inner.get(i + 1) {
            Some(b'"') => b"\"",
            Some(b'\\') => b"\\",
            Some(b'/') => b"/",
            Some(b'b') => b"\x08",
            Some(b'f') => b"\x0c",
            Some(b'n') => b"\n",
            Some(b'r') => b"\r",
            Some(b't') => b"\t",
            _ => b"",
        };
        if !simple.is_empty() {
            if !sink(simple) {
                return;
            }
            i += 2;
            continue;
        }
        let unit = hex4(inner, i + 2).unwrap_or(0xfffd);
        i += 6;
        let code = if (0xd800..0xdc00).contains(&unit) {
            let low = match (inner.get(i), inner.get(i + 1)) {
                (Some(b'\\'), Some(b'u')) => hex4(inner, i + 2),
                _ => None,
            };
            match low {
                Some(low @ 0xdc00..=0xdfff) => {
                    i += 6;
                    0x10000 + ((unit - 0xd800) << 10) + (low - 0xdc00)
                }
                _ => 0xfffd,
            }
        } else {
            unit
        };
        let character = char::from_u32(code).unwrap_or('\u{fffd}');
        let mut utf8 = [0u8; 4];
        if !sink(character.encode_utf8(&mut utf8).as_bytes()) {
            return;
        }
    }
}

fn hex4(bytes: &[u8], at: usize) -> Option<u32> {
    let digits = bytes.get(at..at + 4)?;
    let mut value = 0;
    for &digit in digits {
        value = value << 4 | (char::from(digit).to_digit(16)?);
    }
    Some(value)
}

fn error(offset: usize, reason: &'static str) -> JsonError {
    JsonError { offset, reason }
}

fn kind_at(first: u8) -> Kind {
    match first {
        b'{' => Kind::Object,
        b'[' => Kind::Array,
        b'"' => Kind::String,
        b't' => Kind::True,
        b'f' => Kind::False,
        b'n' => Kind::Null,
        _ => Kind::Number,
    }
}

#[inline(always)]
fn skip_whitespace(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\n' | b'\r' | b'\t') = b.get(i) {
        i += 1;
    }
    i
}

/// Reads `"name" :` at `i` inside an object at `depth`; at depth 1 notes whether the
/// name is one of `keys`. Returns where the member's value starts.
#[inline(always)]
fn member_name(
    b: &[u8],
    i: usize,
    depth: usize,
    keys: &[&[u8]],
    capture: &mut Option<(usize, usize)>,
) -> Result<usize, JsonError> {
    if b.get(i) != Some(&b'"') {
        return Err(error(i, "expected a string member name"));
    }
    let (end, escaped) = string(b, i)?;
    if depth == 1 && !keys.is_empty() {
        let name = &b[i + 1..end - 1];
        let key = if escaped {
            match_escaped_name(name, keys)
        } else {
            find_name(name, keys)
        };
        *capture = None;
        if let Some(key) = key {
            let start = skip_whitespace(b, end);
            if b.get(start) != Some(&b':') {
                return Err(error(start, "expected ':'"));
            }
            let start = skip_whitespace(b, start + 1);
            *capture = Some((key, start));
            return Ok(start);
        }
    }
    let colon = skip_whitespace(b, end);
    if b.get(colon) != Some(&b':') {
        return Err(error(colon, "expected ':'"));
    }
    Ok(skip_whitespace(b, colon + 1))
}

fn match_escaped_name(name: &[u8], keys: &[&[u8]]) -> Option<usize> {
    let mut buffer = [0u8; 64];
    let mut len = 0;
    let mut fits = true;
    unescape(name, |piece| {
        match buffer.get_mut(len..len + piece.len()) {
            Some(slot) => {
                slot.copy_from_slice(piece);
                len += piece.len();
            }
            None => fits = false,
        }
        fits
    });
    if !fits {
        return None;
    }
    find_name(&buffer[..len], keys)
}

/// The index of `name` in `keys`. Names are short and this runs for every top-level
/// member: a plain loop comparing lengths first, then eight bytes at a time, beats
/// iterator adaptors (not inlined in wasm32 code) and calls to `memcmp`.
#[inline(always)]
fn find_name(name: &[u8], keys: &[&[u8]]) -> Option<usize> {
    let mut index = 0;
    while index < keys.len() {
        let key = keys[index];
        if key.len() == name.len() && same_bytes(key, name) {
            return Some(index);
        }
        index += 1;
    }
    None
}

/// Whether two slices of the same length hold the same bytes: eight at a time, without
/// a call to `memcmp` (a loop over single bytes in wasm32 code).
#[inline(always)]
pub fn same_bytes(left: &[u8], right: &[u8]) -> bool {
    let mut i = 0;
    while let (Some(a), Some(b)) = (left.get(i..i + 8), right.get(i..i + 8)) {
        let a = u64::from_le_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]);
        let b = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        if a != b {
            return false;
        }
        i += 8;
    }
    while let (Some(a), Some(b)) = (left.get(i), right.get(i)) {
        if a != b {
            return false;
        }
        i += 1;
    }
    true
}

/// Scans the string starting with the quote at `i`; returns the index after the
/// closing quote and whether it holds escapes.
#[inline(always)]
fn string(b: &[u8], i: usize) -> Result<(usize, bool), JsonError> {
    let j = plain_run_end(b, i + 1);
    if b.get(j) == Some(&b'"') {
        return Ok((j + 1, false));
    }
    string_rest(b, i, j)
}

/// The rest of the string starting with the quote at `i` from `j`, where a byte that
/// needs a closer look stands: escapes, UTF-8, errors. Kept out of line so the scanner's
/// loop stays small.
#[inline(never)]
fn string_rest(b: &[u8], i: usize, mut j: usize) -> Result<(usize, bool), JsonError> {
    let mut escaped = false;
    loop {
        j = plain_run_end(b, j);
        match b.get(j) {
            Some(b'"') => return Ok((j + 1, escaped)),
            Some(b'\\') => {
                escaped = true;
                match b.get(j + 1) {
                    Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => j += 2,
                    Some(b'u') => {
                        if hex4(b, j + 2).is_none() {
                            return Err(error(j, "invalid \\u escape"));
                        }
                        j += 6;
                    }
                    Some(_) => return Err(error(j, "invalid escape")),
                    None => return Err(error(j, "unterminated string")),
                }
            }
            Some(&byte) if byte < 0x20 => {
                return Err(error(j, "control character in string"));
            }
            Some(_) => j = utf8_sequence(b, j)?,
            None => return Err(error(i, "unterminated string")),
        }
    }
}

/// The index of the first byte at or after `j` that is `"`, `\`, a control character
/// or not ASCII (`b.len()` when there is none): where a run of string content that
/// needs no unescaping or UTF-8 check ends. Eight bytes at a time.
#[inline(always)]
pub fn plain_run_end(b: &[u8], mut j: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    while let Some(word) = b.get(j..j + 8) {
        let x = u64::from_le_bytes([
            word[0], word[1], word[2], word[3], word[4], word[5], word[6], word[7],
        ]);
        let quote = x ^ (ONES * u64::from(b'"'));
        let backslash = x ^ (ONES * u64::from(b'\\'));
        // Per byte: zero after xor, below 0x20, or high bit set. The lowest flagged
        // byte is always a true match (borrows only run towards higher bytes).
        let special = (quote.wrapping_sub(ONES) & !quote)
            | (backslash.wrapping_sub(ONES) & !backslash)
            | (x.wrapping_sub(ONES * 0x20) & !x)
            | x;
        let special = special & HIGHS;
        if special != 0 {
            return j + (special.trailing_zeros() / 8) as usize;
        }
        j += 8;
    }
    while let Some(&byte) = b.get(j) {
        if byte == b'"' || byte == b'\\' || !(0x20..0x80).contains(&byte) {
            break;
        }
        j += 1;
    }
    j
}

/// Checks the UTF-8 sequence whose lead byte (>= 0x80) is at `j` (Unicode table 3-7:
/// no overlong forms, no surrogates, nothing past U+10FFFF); returns its end.
fn utf8_sequence(b: &[u8], j: usize) -> Result<usize, JsonError> {
    let lead = b[j];
    let (len, second) = match lead {
        0xc2..=0xdf => (2, 0x80..=0xbf),
        0xe0 => (3, 0xa0..=0xbf),
        0xe1..=0xec | 0xee..=0xef => (3, 0x80..=0xbf),
        0xed => (3, 0x80..=0x9f),
        0xf0 => (4, 0x90..=0xbf),
        0xf1..=0xf3 => (4, 0x80..=0xbf),
        0xf4 => (4, 0x80..=0x8f),
        _ => return Err(error(j, "invalid UTF-8")),
    };
    let valid = match b.get(j + 1..j + len) {
        Some([first, rest @ ..]) => {
            second.contains(first) && rest.iter().all(|byte| byte & 0xc0 == 0x80)
        }
        _ => false,
    };
    if valid {
        Ok(j + len)
    } else {
        Err(error(j, "invalid UTF-8"))
    }
}

/// Scans the number at `i`: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
#[inline(always)]
fn number(b: &[u8], i: usize) -> Result<usize, JsonError> {
    let mut j = i;
    if b.get(j) == Some(&b'-') {
        j += 1;
    }
    match b.get(j) {
        Some(b'0') => j += 1,
        Some(b'1'..=b'9') => j = digits_end(b, j + 1),
        _ => return Err(error(j, "invalid number")),
    }
    if b.get(j) == Some(&b'.') {
        if !matches!(b.get(j + 1), Some(b'0'..=b'9')) {
            return Err(error(j + 1, "invalid number: digit expected after '.'"));
        }
        j = digits_end(b, j + 1);
    }
    if let Some(b'e' | b'E') = b.get(j) {
        j += 1;
        if let Some(b'+' | b'-') = b.get(j) {
            j += 1;
        }
        if !matches!(b.get(j), Some(b'0'..=b'9')) {
            return Err(error(j, "invalid number: digit expected in exponent"));
        }
        j = digits_end(b, j);
    }
    Ok(j)
}

/// The index of the first byte at or after `j` that is not an ASCII digit (`b.len()`
/// when there is none). Eight bytes at a time: timestamps and ids run to 13-19 digits.
#[inline(always)]
pub fn digits_end(b: &[u8], mut j: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const LOWS: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    while let Some(word) = b.get(j..j + 8) {
        let x = u64::from_le_bytes([
            word[0], word[1], word[2], word[3], word[4], word[5], word[6], word[7],
        ]);
        // Per byte, on its low seven bits (so no sum carries into the next byte): the
        // high bit of `at_least_0` is set when the byte is >= b'0', that of `above_9`
        // when it is > b'9'; bytes >= 0x80 are never digits.
        let low = x & LOWS;
        let at_least_0 = low + ONES * (0x80 - u64::from(b'0'));
        let above_9 = low + ONES * (0x80 - u64::from(b'9') - 1);
        let other = (!at_least_0 | above_9 | x) & HIGHS;
        if other != 0 {
            return j + (other.trailing_zeros() / 8) as usize;
        }
        j += 8;
    }
    while let Some(b'0'..=b'9') = b.get(j) {
        j += 1;
    }
    j
}

fn literal(b: &[u8], i: usize, word: &'static [u8]) -> Result<usize, JsonError> {
    if b.get(i..i + word.len()) == Some(word) {
        Ok(i + word.len())
    } else {
        Err(error(i, "expected a value"))
    }
}

#[cfg(test)]
mod tests;
