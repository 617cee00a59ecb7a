#!/usr/bin/env bash
# Regenerates node-runner/src/engine/syscall_table.rs from the kernel headers (linux-libc-dev).
set -euo pipefail
cd "$(dirname "$0")/.."
hdr=/usr/include/x86_64-linux-gnu/asm/unistd_64.h
{
  echo "//! x86_64 syscall names by number, generated from <asm/unistd_64.h> by"
  echo "//! \`scripts/gen-syscall-table.sh\`; do not edit."
  echo
  echo "pub const SYSCALLS_X86_64: &[(u32, &str)] = &["
  grep "#define __NR_" "$hdr" | awk '{sub("__NR_","",$2); printf "    (%s, \"%s\"),\n", $3, $2}'
  echo "];"
} > node-runner/src/engine/syscall_table.rs
