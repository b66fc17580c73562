// Reads the numbered tables of `docs/codec-abi.md` for the tests on both sides of the
// ABI: the SDK's (`lib.rs`) and the engine's (`src/codec/records.rs`) each `include!`
// this file and compare their own constants with what it returns.

/// `(code, NAME)` of each row of the table(s) under the `## heading` section of the
/// ABI document `doc` whose first two cells are a number and an upper-case name
/// (layout tables, whose second cell is a size, are skipped).
fn documented(doc: &str, heading: &str) -> Vec<(i64, String)> {
    let section = doc
        .split("\n## ")
        .find(|section| section.starts_with(heading))
        .unwrap_or_else(|| panic!("docs/codec-abi.md has no section {heading:?}"));
    section
        .lines()
        .filter_map(|line| {
            let mut cells = line.split('|').map(str::trim).skip(1);
            let code = cells.next()?.parse().ok()?;
            let name = cells.next()?;
            name.chars()
                .all(|c| c.is_ascii_uppercase() || c == '_')
                .then(|| (code, name.to_string()))
        })
        .collect()
}

/// `[(code, NAME)]` of every record kind, in the document's order, with the codes taken
/// from `$kind`, the module of `u32` constants of the side under test (each side keeps
/// its own definitions; only the list of names is shared).
macro_rules! record_kinds {
    ($kind:ident) => {
        record_kinds!(@ $kind SEND_TEXT SEND_BINARY READY DATA RESPONSE REQUEST_ERROR
            SUBSCRIBED UNSUBSCRIBED ERROR HEARTBEAT SHARED SEQUENCE_GAP AUTH_FAILED
            MALFORMED SUBSCRIBE_ERROR PASSTHROUGH DATA_IN_INPUT RECONNECT)
    };
    (@ $kind:ident $($name:ident)*) => {
        [$(($kind::$name, stringify!($name))),*]
            .map(|(code, name)| (i64::from(code), name.to_string()))
    };
}

/// `[(bit, NAME)]` of every engine feature (`wirepool_engine_features`), in the
/// document's order, with the bits taken from `$feature`, the side's module of `i32`
/// constants; and that side's `ALL`, checked to be every bit.
macro_rules! engine_features {
    ($feature:ident) => {
        engine_features!(@ $feature DATA_IN_INPUT)
    };
    (@ $feature:ident $($name:ident)*) => {{
        assert_eq!($feature::ALL, 0 $(| $feature::$name)*, "ALL is every feature");
        [$(($feature::$name, stringify!($name))),*]
            .map(|(bit, name)| (i64::from(bit), name.to_string()))
    }};
}
