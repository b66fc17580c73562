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
