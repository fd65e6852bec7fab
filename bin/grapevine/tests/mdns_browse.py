"""Browse `_grapevine._udp.local.` with python-zeroconf (an mDNS implementation independent of
grapevine's mdns-sd) and print one JSON line per service instance found.

Usage: python3 mdns_browse.py SECONDS INTERFACE_IP...   (run inside a network namespace)

Each line: {"name", "resolved", "port", "server", "addresses", "txt"}. Used by
bin/grapevine/tests/mdns_netns.rs to check the records members announce.
"""

import json
import sys
import time

from zeroconf import IPVersion, ServiceBrowser, Zeroconf

SERVICE = "_grapevine._udp.local."


class Listener:
    def __init__(self):
        self.names = set()

    def add_service(self, zc, type_, name):
        self.names.add(name)

    def update_service(self, zc, type_, name):
        self.names.add(name)

    def remove_service(self, zc, type_, name):
        self.names.discard(name)


def main():
    seconds = float(sys.argv[1])
    interfaces = sys.argv[2:] or None
    zc = Zeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
    listener = Listener()
    ServiceBrowser(zc, SERVICE, listener)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    for name in sorted(listener.names):
        info = zc.get_service_info(SERVICE, name, timeout=2000)
        if info is None:
            print(json.dumps({"name": name, "resolved": False}))
            continue
        txt = {}
        for key, value in info.properties.items():
            txt[key.decode("utf-8", "replace")] = None if value is None else value.decode("utf-8", "replace")
        print(json.dumps({
            "name": name,
            "resolved": True,
            "port": info.port,
            "server": info.server,
            "addresses": info.parsed_addresses(),
            "txt": txt,
        }))
    zc.close()


if __name__ == "__main__":
    main()
