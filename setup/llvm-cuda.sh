#!/usr/bin/env bash
# Install LLVM 23 where burn's `cuda` feature looks for it, from Debian's packages, so that
# `cargo build --release --features cuda` builds and links offline.
#
# Usage: setup/llvm-cuda.sh            (no arguments; prints where it installed)
#
# Why: cubecl-cuda 0.11 always compiles its LLVM kernel compiler (pliron -> NVPTX), so cubecl-llvm's
# build script asks tracel-llvm-bundler for LLVM 23.1. The bundler downloads a prebuilt bundle from
# GitHub releases, which this machine cannot reach, unless its folder
#   ${XDG_DATA_HOME:-~/.local/share}/tracel/tracel-llvm-23.1.0-4
# already holds the `.tracel-llvm-installed` sentinel. Building with DOCS_RS=1 skips the download
# but links nothing, hence the undefined LLVM symbols. Debian unstable's llvm-23-dev is the same
# LLVM major as static archives and headers; we lay it out like the bundle:
#   include/, lib/libLLVM*.a   from llvm-23-dev (Debian sid)
#   lib/libzstd.a              from libzstd-dev (Debian bookworm): no libzstd needed at run time
#   lib/libprefhost_glibc_compat.a   the archives were built against glibc 2.43 and call C23's
#                              __isoc23_strto{l,ll,ul,ull} (glibc >= 2.38); on older glibc these are
#                              the classic functions (they differ only in parsing a "0b" prefix);
#                              always ours, so the binary also runs where glibc is older than 2.38
#   bin/llvm-config            a script answering what the bundler asks (Debian's binary needs glibc 2.38)
# Only the NVPTX target is kept: cubecl-cuda compiles for nothing else, and llvm-sys's "initialise
# all targets" wrappers would otherwise link every backend Debian built (X86, AMDGPU, ... : 20 MB of
# the binary). The target lists in include/llvm/Config/*.def name NVPTX alone, and no native target
# is declared, so LLVMInitializeNativeTarget reports failure instead of pulling in X86.
# Idempotent: a folder with a matching .prefhost-llvm stamp is left alone.
set -euo pipefail

PYTHON=${PYTHON:-python3}
LLVM_MAJOR=23
LAYOUT=nvptx-only                    # bump when the folder's layout changes: older installs are redone
BUNDLE=tracel-llvm-23.1.0-4          # the folder name tracel-llvm-bundler 23.1.0-4 looks for
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

data_home=${XDG_DATA_HOME:-$HOME/.local/share}
target="$data_home/tracel/$BUNDLE"
stamp="$target/.prefhost-llvm"
sentinel="$target/.tracel-llvm-installed"

if [ -f "$stamp" ] && grep -q "layout $LAYOUT\$" "$stamp" && [ -f "$sentinel" ] && [ -x "$target/bin/llvm-config" ] && [ -f "$target/lib/libLLVMCore.a" ] \
        && [ -f "$target/include/llvm-c/Core.h" ]; then
    echo "LLVM $(cat "$stamp") already installed in $target" >&2
    exit 0
fi
# Only a folder this script made, or an empty one, may be replaced (never a real tracel bundle).
if [ -e "$target" ] && [ ! -f "$stamp" ] && [ -n "$(ls -A "$target" 2>/dev/null)" ]; then
    echo "error: $target exists and was not made by this script (a tracel-llvm bundle?); leaving it alone" >&2
    exit 1
fi
for tool in gcc ar dpkg-deb; do
    command -v "$tool" >/dev/null || { echo "error: setup/llvm-cuda.sh needs $tool" >&2; exit 1; }
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/llvm-cuda.XXXXXX")
stage="$target.partial.$$"
trap 'rm -rf "$tmp" "$stage"' EXIT
mkdir -p "$(dirname "$target")"

# Downloads the current .deb of PACKAGE from SUITE's index and checks it against the index's SHA256.
fetch_deb() {
    "$PYTHON" - "$MIRROR" "$1" "$2" "$3" <<'PY'
import hashlib, lzma, sys, urllib.request
mirror, suite, package, dest = sys.argv[1:]
index_url = f"{mirror}/dists/{suite}/main/binary-amd64/Packages.xz"
index = lzma.decompress(urllib.request.urlopen(index_url, timeout=120).read()).decode()
for stanza in index.split("\n\n"):
    fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line.startswith(" "))
    if fields.get("Package") == package:
        break
else:
    sys.exit(f"error: {index_url} lists no package {package}")
data = urllib.request.urlopen(f"{mirror}/{fields['Filename']}", timeout=600).read()
if hashlib.sha256(data).hexdigest() != fields["SHA256"]:
    sys.exit(f"error: {fields['Filename']}: SHA256 differs from {index_url}")
open(dest, "wb").write(data)
print(fields["Version"])
PY
}

echo "downloading llvm-$LLVM_MAJOR-dev (Debian sid) and libzstd-dev (Debian bookworm)" >&2
llvm_version=$(fetch_deb sid "llvm-$LLVM_MAJOR-dev" "$tmp/llvm.deb")
zstd_version=$(fetch_deb bookworm libzstd-dev "$tmp/zstd.deb")
dpkg-deb -x "$tmp/llvm.deb" "$tmp/llvm"
dpkg-deb -x "$tmp/zstd.deb" "$tmp/zstd"
src="$tmp/llvm/usr/lib/llvm-$LLVM_MAJOR"

mkdir -p "$stage/bin" "$stage/lib"
cp -rL "$src/include" "$stage/include"   # Debian links include/llvm{,-c} to /usr/include/llvm-23
cp "$src"/lib/libLLVM*.a "$stage/lib/"
rm -f "$stage/lib/libLLVM.a" "$stage/lib/libLLVM-$LLVM_MAJOR.a"
# Every target but NVPTX goes, with the tools built on them (exegesis, BOLT).
for t in AArch64 AMDGPU ARM AVR BPF Hexagon Lanai LoongArch M68k MSP430 Mips PowerPC RISCV SPIRV Sparc \
         SystemZ VE WebAssembly X86 XCore Xtensa Exegesis BOLT; do
    rm -f "$stage/lib/libLLVM$t"*.a
done
"$PYTHON" - "$stage/include/llvm/Config" <<'PY'
import pathlib, re, sys
config = pathlib.Path(sys.argv[1])
for name in ["Targets", "AsmPrinters", "AsmParsers", "Disassemblers", "TargetMCAs", "TargetExegesis"]:
    path = config / f"{name}.def"
    text = path.read_text()
    path.write_text(re.sub(r"^LLVM_[A-Z_]+\((?!NVPTX\))\w+\)\n", "", text, flags=re.M))
if "LLVM_TARGET(NVPTX)" not in (config / "Targets.def").read_text():
    sys.exit("error: llvm-23-dev's Targets.def has no NVPTX target")
header = config / "llvm-config.h"
text, count = re.subn(r"^#define (LLVM_NATIVE_(?:ASMPARSER|ASMPRINTER|DISASSEMBLER|TARGET|TARGETINFO|TARGETMC)) .*$",
                      r"/* \1: no native target, see setup/llvm-cuda.sh */", header.read_text(), flags=re.M)
if count != 6:
    sys.exit(f"error: expected 6 LLVM_NATIVE_* definitions in {header}, found {count}")
header.write_text(text)
PY
cp "$tmp/zstd/usr/lib/x86_64-linux-gnu/libzstd.a" "$stage/lib/"

cat > "$tmp/compat.c" <<'C'
#include <stdlib.h>
long __isoc23_strtol(const char *s, char **end, int base) { return strtol(s, end, base); }
long long __isoc23_strtoll(const char *s, char **end, int base) { return strtoll(s, end, base); }
unsigned long __isoc23_strtoul(const char *s, char **end, int base) { return strtoul(s, end, base); }
unsigned long long __isoc23_strtoull(const char *s, char **end, int base) { return strtoull(s, end, base); }
C
gcc -O2 -fPIC -c "$tmp/compat.c" -o "$tmp/compat.o"
ar rcs "$stage/lib/libprefhost_glibc_compat.a" "$tmp/compat.o"

# The libraries in link order (users before what they use), from the CMake exports of the package.
libs=$("$PYTHON" - "$src/lib/cmake/llvm/LLVMExports.cmake" "$stage/lib" <<'PY'
import os, re, sys
exports, libdir = sys.argv[1:]
text = open(exports).read()
deps = {}
for name, value in re.findall(r'set_target_properties\((LLVM\w+) PROPERTIES\s+INTERFACE_LINK_LIBRARIES "([^"]*)"', text):
    deps[name] = [d for d in value.split(";") if d.startswith("LLVM")]
present = {f[3:-2] for f in os.listdir(libdir) if f.startswith("libLLVM") and f.endswith(".a")}
order, state = [], {}
def visit(lib):
    if state.get(lib) == 2 or lib not in present:
        return
    if state.get(lib) == 1:
        sys.exit(f"error: cycle in LLVM library dependencies at {lib}")
    state[lib] = 1
    for dep in deps.get(lib, []):
        visit(dep)
    state[lib] = 2
    order.append(lib)
for lib in sorted(present):
    visit(lib)
print(" ".join(f"-l{lib}" for lib in reversed(order)))
PY
)

cat > "$stage/bin/llvm-config" <<EOF
#!/bin/sh
# Written by prefhost's setup/llvm-cuda.sh: answers tracel-llvm-bundler's questions about the
# LLVM $llvm_version static libraries in this folder.
root=\$(cd "\$(dirname "\$0")/.." && pwd)
for arg in "\$@"; do
    case "\$arg" in
        --link-static) ;;
        --version) echo "$llvm_version" | sed 's/^1://; s/-.*//' ;;
        --prefix) echo "\$root" ;;
        --libdir) echo "\$root/lib" ;;
        --includedir) echo "\$root/include" ;;
        --libs) echo "$libs -lprefhost_glibc_compat -lzstd" ;;
        --libnames) echo "$libs -lprefhost_glibc_compat -lzstd" | sed 's/-l\([^ ]*\)/lib\1.a/g' ;;
        --system-libs) echo "-lrt -ldl -lm -lz" ;;
        --cflags) echo "-I\$root/include -D_GNU_SOURCE -D__STDC_CONSTANT_MACROS -D__STDC_FORMAT_MACROS -D__STDC_LIMIT_MACROS" ;;
        --cxxflags) echo "-I\$root/include -std=c++17 -fno-exceptions -funwind-tables -D_GNU_SOURCE -D__STDC_CONSTANT_MACROS -D__STDC_FORMAT_MACROS -D__STDC_LIMIT_MACROS" ;;
        *) echo "llvm-config (prefhost): unsupported argument \$arg" >&2; exit 1 ;;
    esac
done
EOF
chmod +x "$stage/bin/llvm-config"
echo "llvm-$LLVM_MAJOR-dev $llvm_version + libzstd-dev $zstd_version, layout $LAYOUT" > "$stage/.prefhost-llvm"
touch "$stage/.tracel-llvm-installed"

rm -rf "$target"
mv "$stage" "$target"
echo "installed LLVM $llvm_version (Debian) in $target; now: cargo build --release --features cuda" >&2
