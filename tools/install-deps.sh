#!/usr/bin/env bash
# System packages HyperNAT's build, tests and testbed use.  Installs only what is
# missing, and only as root with apt-get (elsewhere it says what is missing).
#   nftables, iproute2, ethtool, iperf3: the namespace testbed and Linux's NAT peer
#   traceroute, iputils-tracepath: the testbed's router checks (the gateway's own ICMP)
#   libxdp-dev, libbpf-dev, pkg-config: the optional AF_XDP backend
#   gcc-aarch64-linux-gnu, libc6-dev-arm64-cross: the portability check (the fast path must
#     build for ARM); debootstrap, debian-archive-keyring, qemu-user-static, binfmt-support:
#     its arm64 root, where the fast-path tests run under qemu (tools/arm64-root.sh);
#     ccache: keeps its cross-compiled objects between runs
#   frr: the fleet's BGP speakers and the testbed's routers (bgpd, bfdd, zebra; hypernat/fleet)
#   iputils-ping, bind9-dnsutils, dnsmasq-base: fragments through the testbed (ping -s 4000,
#   a DNS answer larger than the path MTU, tests/test_lab_fragments.py)
set -euo pipefail
want=(nftables iproute2 ethtool iperf3 libxdp-dev libbpf-dev pkg-config gcc-aarch64-linux-gnu make gcc file
      libc6-dev-arm64-cross debootstrap debian-archive-keyring qemu-user-static binfmt-support ccache
      iputils-ping bind9-dnsutils dnsmasq-base traceroute iputils-tracepath)
want+=(frr)
python3 -m venv --help >/dev/null 2>&1 || want+=(python3-venv)
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "install-deps: missing system packages (install them as root): ${missing[*]}" >&2
  exit 0
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=600 update -qq
apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
