#!/bin/sh
# Build the Xen lab's dom0 image from Debian packages (run as root; no loop devices, no mounts):
#   build-image.sh OUT_DIR APT_SOURCES_FILE PACKAGES_FILE
# writes OUT_DIR/{xen,vmlinuz,dom0.cpio,packages.lst}:
#   xen          Xen's multiboot ELF (/boot/xen-4.17-amd64.gz of the hypervisor package, unpacked)
#   vmlinuz      the dom0 kernel
#   dom0.cpio    the minbase root filesystem as an uncompressed newc cpio (the kernel unpacks it)
#   packages.lst `dpkg-query -W` of the image, for the record
# OUT_DIR appears only when complete (built beside it, then renamed).
set -eu

out=$1
sources=$2
pkgfile=$3
suite=${XENDBG_LAB_SUITE:-bookworm}
# Modules dom0's /init loads (with their dependencies); every other module is dropped: the
# full set is ~400 MB and the kernel would unpack all of it into RAM at each boot.
keep_modules="xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs"

[ "$(id -u)" = 0 ] || { echo "build-image.sh: must run as root" >&2; exit 1; }
pkgs=$(sed -e 's/#.*//' "$pkgfile" | tr -s ' \n' ',' | sed -e 's/^,//' -e 's/,$//')
work=$(mktemp -d "${out%/}.work.XXXXXX")
chmod 755 "$work"
trap 'rm -rf "$work"' EXIT
root=$work/root

mmdebstrap --variant=minbase --include="$pkgs" \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  "$suite" "$root" "$sources"

kver=$(basename "$(ls -d "$root"/lib/modules/* | head -n 1)")
keep=$work/keep-modules
: >"$keep"
for m in $keep_modules; do
  # Built-in modules print "builtin ..."; only insmod lines name files to keep.
  deps=$(chroot "$root" modprobe -S "$kver" --show-depends "$m") || {
    echo "build-image.sh: kernel $kver has no module $m" >&2
    exit 1
  }
  printf '%s\n' "$deps" | sed -n "s|^insmod \([^ ]*\).*|$root\1|p" >>"$keep"
done
find "$root/lib/modules/$kver/kernel" -type f | grep -vxF -f "$keep" | xargs -r rm -f
find "$root/lib/modules/$kver/kernel" -depth -type d -empty -delete
chroot "$root" depmod "$kver"

gunzip -c "$root"/boot/xen-4.17-amd64.gz >"$work/xen"
cp "$root/boot/vmlinuz-$kver" "$work/vmlinuz"
rm -rf "$root"/boot/* "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* \
  "$root"/usr/lib/udev/hwdb.*
# Static libraries are dead weight, but libc.so's linker script names libc_nonshared.a: keep it
# so that gcc in dom0 can link (bench/xen/foreign_read.c).
find "$root"/usr/lib/x86_64-linux-gnu -maxdepth 1 -name '*.a' ! -name libc_nonshared.a -delete
# The kernel opens /dev/console for /init before anything is mounted.
[ -e "$root/dev/console" ] || mknod -m 600 "$root/dev/console" c 5 1
dpkg-query --admindir="$root/var/lib/dpkg" -W >"$work/packages.lst"

(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null --quiet -o -H newc) >"$work/dom0.cpio"
rm -rf "$root"
trap - EXIT
rm -rf "$out"
mv "$work" "$out"
