#!/usr/bin/env bash
# Build-stage helper of the Dockerfile: copies every shared library that the given binaries load
# into DEST (named by soname, symlinks resolved), so the runtime stage needs no packages.
#   collect-runtime-libs.sh DEST EXTRA_DIR BINARY...
# EXTRA_DIR (may be empty) is copied whole as well: a libtorch zip's lib/ folder, whose CUDA
# libraries (cuDNN's sub-libraries, NVRTC) are dlopen'ed and so invisible to ldd.
# Left out: the C library, libstdc++ and libgcc_s, which the runtime image (the same distribution
# release as the build image) has; and the NVIDIA driver (libcuda, libnvidia-*), which the
# NVIDIA container runtime mounts at run time.
set -euo pipefail
dest=$1
extra=$2
shift 2
mkdir -p "$dest"

system='^(linux-vdso|linux-gate|ld-linux.*|libc|libm|libmvec|libpthread|libdl|librt|libresolv|libutil|libanl|libnsl|libBrokenLocale|libnss_.*|libthread_db|libc_malloc_debug|libgcc_s|libstdc\+\+)\.so'
driver='^(libcuda|libnvidia-.*|libnvcuvid|libnvoptix)\.so'

objects=("$@")
if [ -n "$extra" ]; then
  cp -a "$extra"/. "$dest"/
  while IFS= read -r -d '' lib; do objects+=("$lib"); done \
    < <(find "$extra" -maxdepth 1 -type f -name '*.so*' -print0)
fi

missing=0
for object in "${objects[@]}"; do
  # Lines look like "libfoo.so.1 => /usr/lib/x86_64-linux-gnu/libfoo.so.1 (0x...)".
  while read -r name arrow path _; do
    [ "$arrow" = "=>" ] || continue
    [[ $name =~ $system ]] && continue
    if [ "$path" = "not" ]; then
      [[ $name =~ $driver ]] && continue
      # Libraries beside a libtorch zip's own are found through DEST at run time.
      [ -e "$dest/$name" ] && continue
      echo "collect-runtime-libs: $object needs $name, which is not found" >&2
      missing=1
      continue
    fi
    [ -e "$dest/$name" ] || cp -L "$path" "$dest/$name"
  done < <(ldd "$object" 2>/dev/null || true)
done
[ "$missing" -eq 0 ] || exit 1
echo "collect-runtime-libs: $(find "$dest" -maxdepth 1 -name '*.so*' | wc -l) libraries," \
     "$(du -sh "$dest" | cut -f1)"
