//! ELF reading for uprobes and USDT: symbol tables and `.note.stapsdt` notes.

use std::{
    fs,
    path::{Path, PathBuf},
};

use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, ReadCache, SymbolKind};

/// Why a binary cannot be probed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    #[error(
        "{0} does not exist; give the absolute path of the binary or library (e.g. /usr/lib/x86_64-linux-gnu/libc.so.6)"
    )]
    Missing(String),
    #[error("{0} is not an ELF binary or library")]
    NotElf(String),
    #[error(
        "{0} is a relative path; give the absolute path of the binary or library (e.g. /usr/bin/bash), or a library's name (libc)"
    )]
    Relative(String),
    #[error(
        "{binary} has no function symbol {symbol:?}; `fathom list 'uprobe:{binary}:*{symbol}*'` lists similar ones"
    )]
    NoSymbol { binary: String, symbol: String },
    #[error(
        "{binary} has no USDT probe {provider}:{name}; `fathom list 'usdt:{binary}'` lists its probes"
    )]
    NoUsdt {
        binary: String,
        provider: String,
        name: String,
    },
}

/// Library names (`libc`) resolve through the usual directories; paths must be absolute (a
/// relative one would name a file by the runner's working directory) and name a regular file.
pub fn resolve_binary(binary: &Path) -> Result<PathBuf, ElfError> {
    let name = binary.to_string_lossy();
    if name.contains('/') && !binary.is_absolute() {
        return Err(ElfError::Relative(name.into_owned()));
    }
    if binary.is_absolute() && binary.is_file() {
        return Ok(binary.to_path_buf());
    }
    if !name.contains('/') {
        for dir in [
            "/usr/lib/x86_64-linux-gnu",
            "/lib/x86_64-linux-gnu",
            "/usr/lib64",
            "/lib64",
            "/usr/lib",
            "/lib",
            "/usr/bin",
            "/bin",
            "/usr/sbin",
        ] {
            let Ok(entries) = fs::read_dir(dir) else {
                continue;
            };
            // `libc.so` is often a linker script; only real ELF files qualify.
            let mut found: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().is_some_and(|f| {
                        let f = f.to_string_lossy();
                        f == name || f.starts_with(&format!("{name}.so"))
                    })
                })
                .filter(|p| is_elf(p))
                .collect();
            found.sort();
            if let Some(p) = found.into_iter().next() {
                return Ok(p);
            }
        }
    }
    Err(ElfError::Missing(name.into_owned()))
}

fn is_elf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

/// The binary, opened for reading only the parts a parse asks for: its headers, symbol
/// tables and notes, never the whole file (a binary is user-named, may be huge, and may be
/// changed under us by the container it belongs to: reads fail, nothing is mapped).
fn open(binary: &Path) -> Result<(PathBuf, ReadCache<fs::File>), ElfError> {
    let path = resolve_binary(binary)?;
    let file = fs::File::open(&path).map_err(|_| ElfError::Missing(path.display().to_string()))?;
    // The file opened, not the name looked at before: it may have been swapped since.
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return Err(ElfError::NotElf(path.display().to_string()));
    }
    Ok((path, ReadCache::new(file)))
}

/// Function symbols of a binary (`.symtab` and `.dynsym`), sorted and deduplicated.
pub fn function_symbols(binary: &Path) -> Result<Vec<String>, ElfError> {
    let (path, data) = open(binary)?;
    let file =
        object::File::parse(&data).map_err(|_| ElfError::NotElf(path.display().to_string()))?;
    let mut names: Vec<String> = file
        .symbols()
        .chain(file.dynamic_symbols())
        .filter(|s| s.kind() == SymbolKind::Text && s.address() != 0)
        .filter_map(|s| s.name().ok().map(str::to_string))
        .filter(|n| !n.is_empty())
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Checks that `symbol` is a function of `binary`.
pub fn symbol_exists(binary: &Path, symbol: &str) -> Result<(), ElfError> {
    let names = function_symbols(binary)?;
    // Versioned dynamic symbols (`malloc@@GLIBC_2.2.5`) match their plain name.
    if names
        .iter()
        .any(|n| n == symbol || n.split('@').next() == Some(symbol))
    {
        Ok(())
    } else {
        Err(ElfError::NoSymbol {
            binary: binary.display().to_string(),
            symbol: symbol.to_string(),
        })
    }
}

/// One USDT probe from `.note.stapsdt`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsdtProbe {
    pub provider: String,
    pub name: String,
    /// The probe's virtual address (adjusted for prelink).
    pub address: u64,
    /// The file offset a uprobe attaches at.
    pub offset: u64,
    pub semaphore: u64,
    pub args: String,
}

/// Every USDT probe of a binary.
pub fn usdt_probes(binary: &Path) -> Result<Vec<UsdtProbe>, ElfError> {
    let (path, data) = open(binary)?;
    let file =
        object::File::parse(&data).map_err(|_| ElfError::NotElf(path.display().to_string()))?;
    let Some(notes) = file.section_by_name(".note.stapsdt") else {
        return Ok(Vec::new());
    };
    let base_addr = file.section_by_name(".stapsdt.base").map(|s| s.address());
    let Ok(bytes) = notes.data() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    let mut rest = bytes;
    // Each note: namesz, descsz, type (u32 LE), name (aligned 4), desc (aligned 4).
    while rest.len() >= 12 {
        let u32_at = |b: &[u8], i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let namesz = u32_at(rest, 0) as usize;
        let descsz = u32_at(rest, 4) as usize;
        let ntype = u32_at(rest, 8);
        let name_end = 12 + namesz.div_ceil(4) * 4;
        let desc_end = name_end + descsz.div_ceil(4) * 4;
        if desc_end > rest.len() {
            break;
        }
        let owner = &rest[12..12 + namesz];
        let desc = &rest[name_end..name_end + descsz];
        rest = &rest[desc_end..];
        if ntype != 3 || !owner.starts_with(b"stapsdt") || desc.len() < 24 {
            continue;
        }
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&desc[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let mut pc = u64_at(0);
        let base = u64_at(8);
        let semaphore = u64_at(16);
        if let Some(actual) = base_addr {
            pc = pc.wrapping_add(actual).wrapping_sub(base);
        }
        let mut strings = desc[24..].split(|b| *b == 0);
        let provider = String::from_utf8_lossy(strings.next().unwrap_or_default()).into_owned();
        let name = String::from_utf8_lossy(strings.next().unwrap_or_default()).into_owned();
        let args = String::from_utf8_lossy(strings.next().unwrap_or_default()).into_owned();
        let offset = file
            .segments()
            .find(|s| pc >= s.address() && pc < s.address() + s.size())
            .map(|s| pc - s.address() + s.file_range().0)
            .unwrap_or(pc);
        out.push(UsdtProbe {
            provider,
            name,
            address: pc,
            offset,
            semaphore,
            args,
        });
    }
    Ok(out)
}

/// The file offset of USDT probe `provider:name` in `binary`.
pub fn usdt_offset(binary: &Path, provider: &str, name: &str) -> Result<u64, ElfError> {
    usdt_probes(binary)?
        .into_iter()
        .find(|p| p.provider == provider && p.name == name)
        .map(|p| p.offset)
        .ok_or_else(|| ElfError::NoUsdt {
            binary: binary.display().to_string(),
            provider: provider.to_string(),
            name: name.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_libc_functions_by_library_name() {
        let libc = resolve_binary(Path::new("libc")).expect("libc resolves");
        assert!(libc.to_string_lossy().contains("libc"), "{libc:?}");
        symbol_exists(&libc, "malloc").expect("malloc is in libc");
        assert!(matches!(
            symbol_exists(&libc, "no_such_function_xyz"),
            Err(ElfError::NoSymbol { .. })
        ));
    }

    #[test]
    fn missing_and_non_elf_files_are_told_apart() {
        assert!(matches!(
            symbol_exists(Path::new("/nonexistent/bin"), "main"),
            Err(ElfError::Missing(_))
        ));
        assert!(matches!(
            symbol_exists(Path::new("/etc/hostname"), "main"),
            Err(ElfError::NotElf(_))
        ));
    }

    #[test]
    fn relative_paths_and_what_is_not_a_regular_file_are_refused() {
        for relative in ["bin/bash", "./bash", "../usr/bin/bash"] {
            assert_eq!(
                symbol_exists(Path::new(relative), "main"),
                Err(ElfError::Relative(relative.into())),
                "{relative}"
            );
        }
        // A directory, a character device: nothing is read from them.
        for path in ["/usr/bin", "/dev/zero"] {
            assert!(
                matches!(
                    symbol_exists(Path::new(path), "main"),
                    Err(ElfError::Missing(_) | ElfError::NotElf(_))
                ),
                "{path}"
            );
        }
    }

    /// Peak resident memory of this process, in KiB.
    fn peak_rss_kib() -> u64 {
        fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or(0)
    }

    #[test]
    fn a_huge_file_is_not_read_whole() {
        // 4 GiB (sparse) that starts like a 64-bit ELF file: it was read into memory whole.
        let path = std::env::temp_dir().join(format!("fathom-elf-huge-{}", std::process::id()));
        let file = fs::File::create(&path).expect("temp file");
        std::io::Write::write_all(&mut &file, b"\x7fELF\x02\x01\x01").expect("header");
        file.set_len(4 << 30).expect("sparse length");
        let before = peak_rss_kib();
        let result = function_symbols(&path);
        let grown = peak_rss_kib().saturating_sub(before);
        fs::remove_file(&path).ok();
        // Its zeroed headers read as an ELF file without sections, or as no ELF file.
        assert!(
            matches!(&result, Ok(s) if s.is_empty()) || matches!(result, Err(ElfError::NotElf(_))),
            "{result:?}"
        );
        assert!(grown < 64 * 1024, "peak RSS grew by {grown} KiB");
    }

    #[test]
    fn reads_usdt_notes_of_libstdcxx() {
        // GCC's libstdc++ carries SDT notes for exceptions (libstdcxx:throw, :catch, :rethrow).
        let lib = Path::new("libstdc++");
        let probes = usdt_probes(lib).expect("libstdc++ parses");
        let throw = probes
            .iter()
            .find(|p| p.provider == "libstdcxx" && p.name == "throw")
            .expect("libstdcxx:throw note");
        assert!(throw.offset > 0 && throw.address > 0);
        assert_eq!(usdt_offset(lib, "libstdcxx", "throw"), Ok(throw.offset));
        assert!(matches!(
            usdt_offset(lib, "nope", "nope"),
            Err(ElfError::NoUsdt { .. })
        ));
    }
}
