//! Pinned maps as older layouts had them, for the upgrade tests.
use crate::NetNs;

/// Replaces pinned map `name` with an empty one of another value size, as
/// an older layout had it.
pub fn pin_old_map(ns: &NetNs, dir: &str, name: &str, kind: &str, value_size: usize) {
    pin_old_keyed_map(ns, dir, name, kind, 4, value_size);
}

/// [`pin_old_map`] with keys of `key_size` bytes.
pub fn pin_old_keyed_map(
    ns: &NetNs,
    dir: &str,
    name: &str,
    kind: &str,
    key_size: usize,
    value_size: usize,
) {
    let path = format!("{dir}/{name}");
    let _ = std::fs::remove_file(&path);
    let (key, value) = (key_size.to_string(), value_size.to_string());
    ns.exec(&[
        "bpftool", "map", "create", &path, "type", kind, "key", &key, "value", &value, "entries",
        "1", "name", name,
    ]);
}

/// Writes SETTINGS of `size` bytes with `version` first.
pub fn pin_old_settings(ns: &NetNs, dir: &str, version: u8, size: usize) {
    pin_old_map(ns, dir, "SETTINGS", "array", size);
    let settings = format!("{dir}/SETTINGS");
    let version = version.to_string();
    let mut update = vec![
        "bpftool", "map", "update", "pinned", &settings, "key", "0", "0", "0", "0", "value",
    ];
    update.extend([version.as_str(), "0", "0", "0"]);
    update.extend(vec!["0"; size - 4]);
    ns.exec(&update);
}
