//! tracefs: where tracepoints are listed and described (their format files).

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

/// A mounted tracefs.
#[derive(Clone, Debug)]
pub struct TraceFs {
    root: PathBuf,
}

const CANDIDATES: &[&str] = &["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

impl TraceFs {
    /// A tracefs at `root` (tests point this at a fake tree).
    pub fn at(root: impl Into<PathBuf>) -> TraceFs {
        TraceFs { root: root.into() }
    }

    /// Finds a mounted tracefs, mounting one at /sys/kernel/tracing when none is.
    pub fn locate_or_mount() -> Result<TraceFs, String> {
        for c in CANDIDATES {
            if Path::new(c).join("events").is_dir() {
                return Ok(TraceFs::at(*c));
            }
        }
        let target = CANDIDATES[0];
        let _ = fs::create_dir_all(target);
        mount("tracefs", target, "tracefs").map_err(|e| {
            format!("tracefs is not mounted and mounting it at {target} failed ({e}); mount it with `mount -t tracefs tracefs {target}` or run as root")
        })?;
        if Path::new(target).join("events").is_dir() {
            Ok(TraceFs::at(target))
        } else {
            Err(format!(
                "mounted tracefs at {target} but it has no events directory; is CONFIG_FTRACE enabled?"
            ))
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn events(&self) -> PathBuf {
        self.root.join("events")
    }

    /// Whether `category/name` exists.
    pub fn has_tracepoint(&self, category: &str, name: &str) -> bool {
        self.events()
            .join(category)
            .join(name)
            .join("format")
            .is_file()
    }

    /// The categories a tracepoint `name` exists in (raw tracepoints are named without one).
    pub fn categories_of(&self, name: &str) -> Vec<String> {
        self.tracepoints()
            .into_iter()
            .filter(|(_, n)| n == name)
            .map(|(c, _)| c)
            .collect()
    }

    /// Every tracepoint as (category, name), sorted.
    pub fn tracepoints(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let Ok(cats) = fs::read_dir(self.events()) else {
            return out;
        };
        for cat in cats.flatten() {
            if !cat.path().is_dir() {
                continue;
            }
            let cat_name = cat.file_name().to_string_lossy().into_owned();
            let Ok(names) = fs::read_dir(cat.path()) else {
                continue;
            };
            for n in names.flatten() {
                if n.path().join("format").is_file() {
                    out.push((
                        cat_name.clone(),
                        n.file_name().to_string_lossy().into_owned(),
                    ));
                }
            }
        }
        out.sort();
        out
    }

    /// The parsed format file of `category/name`.
    pub fn format(&self, category: &str, name: &str) -> io::Result<TracepointFormat> {
        let text = fs::read_to_string(self.events().join(category).join(name).join("format"))?;
        Ok(TracepointFormat::parse(&text))
    }

    /// Kernel functions ftrace can trace (`available_filter_functions`), when the file exists.
    pub fn traceable_functions(&self) -> Option<std::collections::HashSet<String>> {
        let text = fs::read_to_string(self.root.join("available_filter_functions")).ok()?;
        Some(
            text.lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_string)
                .collect(),
        )
    }

    /// Whether the kernel has kprobe support (the kprobe_events file or the kprobe PMU).
    pub fn has_kprobes(&self) -> bool {
        self.root.join("kprobe_events").exists()
            || Path::new("/sys/bus/event_source/devices/kprobe").exists()
    }
}

fn mount(source: &str, target: &str, fstype: &str) -> io::Result<()> {
    let status = std::process::Command::new("mount")
        .args(["-t", fstype, source, target])
        .stderr(std::process::Stdio::null())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("mount exited with {status}")))
    }
}

/// Mounts bpffs at /sys/fs/bpf when it is not mounted (pins live there).
pub fn ensure_bpffs() -> Result<(), String> {
    let target = "/sys/fs/bpf";
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(target) && l.contains(" bpf "))
    {
        return Ok(());
    }
    let _ = fs::create_dir_all(target);
    mount("bpf", target, "bpf").map_err(|e| {
        format!("bpffs is not mounted at {target} and mounting it failed ({e}); run `mount -t bpf bpf {target}` as root")
    })
}

/// One field of a tracepoint record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TpField {
    pub name: String,
    /// The C declaration without the name, e.g. `unsigned short`, `__data_loc char[]`, `__u8[4]`.
    pub c_type: String,
    pub offset: u32,
    pub size: u32,
    pub signed: bool,
}

impl TpField {
    /// A `__data_loc` string (offset/length word pointing into the record).
    pub fn is_data_loc(&self) -> bool {
        self.c_type.starts_with("__data_loc")
    }

    /// A `const char *` (a pointer to a string in user or kernel memory).
    pub fn is_char_pointer(&self) -> bool {
        self.c_type.contains("char *") || self.c_type.contains("char*")
    }

    /// A number the kernel program can read (1, 2, 4 or 8 bytes, not an array).
    pub fn is_scalar(&self) -> bool {
        !self.is_data_loc() && matches!(self.size, 1 | 2 | 4 | 8) && !self.c_type.contains('[')
    }

    /// A 4-byte array (IPv4 address fields such as `daddr`).
    pub fn is_ipv4(&self) -> bool {
        self.size == 4 && self.c_type.contains("[4]")
    }
}

/// A parsed format file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TracepointFormat {
    pub id: u32,
    /// Every field, `common_*` ones included.
    pub fields: Vec<TpField>,
    pub print_fmt: String,
}

impl TracepointFormat {
    pub fn parse(text: &str) -> TracepointFormat {
        let mut f = TracepointFormat::default();
        for line in text.lines() {
            let line = line.trim();
            if let Some(id) = line.strip_prefix("ID:") {
                f.id = id.trim().parse().unwrap_or(0);
            } else if let Some(p) = line.strip_prefix("print fmt:") {
                f.print_fmt = p.trim().to_string();
            } else if let Some(rest) = line.strip_prefix("field:")
                && let Some(field) = parse_field(rest)
            {
                f.fields.push(field);
            }
        }
        f
    }

    pub fn field(&self, name: &str) -> Option<&TpField> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Fields without the `common_*` header fields.
    pub fn own_fields(&self) -> impl Iterator<Item = &TpField> {
        self.fields
            .iter()
            .filter(|f| !f.name.starts_with("common_"))
    }

    /// The names `__print_symbolic(REC->field, { value, "NAME" }, …)` gives a field's values.
    /// Whether the kernel prints `field` as an address (`%p`, `%pS`, `%px`…): a field that
    /// holds an address although it is declared as a number, such as `call_site`.
    pub fn printed_as_address(&self, field: &str) -> bool {
        let fmt = self.print_fmt.as_str();
        let Some(body_start) = fmt.find('"') else {
            return false;
        };
        let Some(body_len) = fmt[body_start + 1..].find('"') else {
            return false;
        };
        let body = &fmt[body_start + 1..body_start + 1 + body_len];
        // The conversions of the format string, in order: whether each is `%p…`.
        let mut conversions = Vec::new();
        let mut chars = body.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '%' {
                continue;
            }
            if chars.peek() == Some(&'%') {
                chars.next();
                continue;
            }
            while chars
                .peek()
                .is_some_and(|c| "-+ #0123456789.*lhzjt".contains(*c))
            {
                chars.next();
            }
            conversions.push(chars.next() == Some('p'));
        }
        // The arguments after the format string, split at top-level commas.
        let mut args = Vec::new();
        let (mut depth, mut start) = (0i32, 0usize);
        let rest = &fmt[body_start + 1 + body_len + 1..];
        for (i, c) in rest.char_indices() {
            match c {
                '(' | '{' | '[' => depth += 1,
                ')' | '}' | ']' => depth -= 1,
                ',' if depth == 0 => {
                    args.push(&rest[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        args.push(&rest[start..]);
        let needle = format!("REC->{field}");
        // args[0] is what precedes the first comma (nothing).
        args.iter().skip(1).zip(conversions).any(|(a, is_ptr)| {
            is_ptr
                && a.match_indices(&needle).any(|(i, _)| {
                    !a[i + needle.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_')
                })
        })
    }

    pub fn symbolic(&self, field: &str) -> BTreeMap<u64, String> {
        let mut out = BTreeMap::new();
        let needle = format!("__print_symbolic(REC->{field},");
        let Some(start) = self.print_fmt.find(&needle) else {
            return out;
        };
        let mut rest = &self.print_fmt[start + needle.len()..];
        // Pairs look like `{ 2, "NOT_SPECIFIED" }` until the closing parenthesis.
        while let Some(open) = rest.find('{') {
            if let Some(close_paren) = rest.find(')')
                && close_paren < open
            {
                break;
            }
            let Some(close) = rest[open..].find('}') else {
                break;
            };
            let pair = &rest[open + 1..open + close];
            if let Some((num, name)) = pair.split_once(',') {
                let num = num.trim();
                let parsed = if let Some(hex) = num.strip_prefix("0x") {
                    u64::from_str_radix(hex, 16).ok()
                } else {
                    num.parse::<i64>().ok().map(|v| v as u64)
                };
                if let Some(v) = parsed {
                    out.insert(v, name.trim().trim_matches('"').to_string());
                }
            }
            rest = &rest[open + close + 1..];
        }
        out
    }
}

fn parse_field(rest: &str) -> Option<TpField> {
    // "unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;"
    let mut parts = rest.split(';').map(str::trim);
    let decl = parts.next()?;
    let mut offset = None;
    let mut size = None;
    let mut signed = false;
    for p in parts {
        if let Some(v) = p.strip_prefix("offset:") {
            offset = v.parse().ok();
        } else if let Some(v) = p.strip_prefix("size:") {
            size = v.parse().ok();
        } else if let Some(v) = p.strip_prefix("signed:") {
            signed = v == "1";
        }
    }
    let (c_type, name) = split_decl(decl);
    Some(TpField {
        name,
        c_type,
        offset: offset?,
        size: size?,
        signed,
    })
}

/// `unsigned long args[6]` → (`unsigned long[6]`, `args`); `__data_loc char[] filename` →
/// (`__data_loc char[]`, `filename`).
fn split_decl(decl: &str) -> (String, String) {
    let decl = decl.trim();
    let (head, last) = match decl.rsplit_once(char::is_whitespace) {
        Some((h, l)) => (h.trim(), l.trim()),
        None => ("", decl),
    };
    let (name, array) = match last.find('[') {
        Some(i) => (&last[..i], &last[i..]),
        None => (last, ""),
    };
    let name = name.trim_start_matches('*');
    let stars = last.len() - last.trim_start_matches('*').len();
    let c_type = format!("{head}{}{array}", " *".repeat(stars).trim_end());
    (c_type, name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KFREE_SKB: &str = "name: kfree_skb\nID: 1513\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:unsigned short protocol;\toffset:24;\tsize:2;\tsigned:0;\n\tfield:enum skb_drop_reason reason;\toffset:28;\tsize:4;\tsigned:0;\n\nprint fmt: \"skbaddr=%p protocol=%u location=%pS reason: %s\", REC->skbaddr, REC->protocol, REC->location, __print_symbolic(REC->reason, { 2, \"NOT_SPECIFIED\" }, { 3, \"NO_SOCKET\" }, { 0x10, \"HEX\" })\n";

    #[test]
    fn parses_fields_and_symbolic_names() {
        let f = TracepointFormat::parse(KFREE_SKB);
        assert_eq!(f.id, 1513);
        let reason = f.field("reason").expect("reason");
        assert_eq!((reason.offset, reason.size, reason.signed), (28, 4, false));
        assert_eq!(reason.c_type, "enum skb_drop_reason");
        let names = f.symbolic("reason");
        assert_eq!(names.get(&2).map(String::as_str), Some("NOT_SPECIFIED"));
        assert_eq!(names.get(&3).map(String::as_str), Some("NO_SOCKET"));
        assert_eq!(names.get(&16).map(String::as_str), Some("HEX"));
        assert_eq!(f.own_fields().count(), 4);
        assert!(f.symbolic("protocol").is_empty());
    }

    #[test]
    fn fields_printed_as_addresses_are_told_apart() {
        let f = TracepointFormat::parse(KFREE_SKB);
        assert!(f.printed_as_address("skbaddr"));
        assert!(f.printed_as_address("location"));
        assert!(!f.printed_as_address("protocol"));
        assert!(!f.printed_as_address("reason"));
        let kmalloc = TracepointFormat::parse(
            "name: kmalloc\nformat:\n\tfield:unsigned long call_site;\toffset:8;\tsize:8;\tsigned:0;\n\tfield:const void * ptr;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:size_t bytes_req;\toffset:24;\tsize:8;\tsigned:0;\n\nprint fmt: \"call_site=%pS ptr=%p bytes_req=%zu\", (void *)REC->call_site, REC->ptr, REC->bytes_req\n",
        );
        assert!(kmalloc.printed_as_address("call_site"));
        assert!(kmalloc.printed_as_address("ptr"));
        assert!(!kmalloc.printed_as_address("bytes_req"));
        assert!(!kmalloc.printed_as_address("call"));
    }

    #[test]
    fn splits_declarations() {
        assert_eq!(
            split_decl("unsigned long args[6]"),
            ("unsigned long[6]".into(), "args".into())
        );
        assert_eq!(
            split_decl("__data_loc char[] filename"),
            ("__data_loc char[]".into(), "filename".into())
        );
        assert_eq!(
            split_decl("const char * filename"),
            ("const char *".into(), "filename".into())
        );
        assert_eq!(
            split_decl("__u8 daddr[4]"),
            ("__u8[4]".into(), "daddr".into())
        );
    }
}
