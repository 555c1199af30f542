"""Loaded by every Python process started with this folder on PYTHONPATH (the no-network tests put it there):
connections and name lookups beyond this machine raise `NetworkBlocked` and are logged to `$SM_NONET_LOG`."""
import os, socket

LOCAL_HOSTS = ('localhost', '127.0.0.1', '::1', '0.0.0.0', '', None)


class NetworkBlocked(OSError):
    "A connection or lookup beyond this machine, made while networking is disabled for a test."


def _is_local(host) -> bool:
    if isinstance(host, bytes): host = host.decode()
    return host in LOCAL_HOSTS or str(host).startswith('127.')


def _refuse(what: str):
    log = os.environ.get('SM_NONET_LOG')
    if log:
        with open(log, 'a') as f: f.write(f'pid {os.getpid()}: {what}\n')
    raise NetworkBlocked(f'network access is disabled for this process: {what}')


_orig = {}


def install():
    "Refuse non-local connections and lookups in this process (idempotent)."
    if _orig: return
    _orig.update(connect=socket.socket.connect, connect_ex=socket.socket.connect_ex, sendto=socket.socket.sendto,
                 getaddrinfo=socket.getaddrinfo, create_connection=socket.create_connection)

    def _check(sock, addr, what):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(addr, tuple) and not _is_local(addr[0]):
            _refuse(f'{what} {addr[:2]}')

    def connect(self, addr): _check(self, addr, 'connect'); return _orig['connect'](self, addr)
    def connect_ex(self, addr): _check(self, addr, 'connect'); return _orig['connect_ex'](self, addr)
    def sendto(self, data, *args): _check(self, args[-1], 'sendto'); return _orig['sendto'](self, data, *args)
    def getaddrinfo(host, *a, **k):
        if not _is_local(host): _refuse(f'lookup {host!r}')
        return _orig['getaddrinfo'](host, *a, **k)
    def create_connection(address, *a, **k):
        if not _is_local(address[0]): _refuse(f'connect {address[:2]}')
        return _orig['create_connection'](address, *a, **k)
    socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto = connect, connect_ex, sendto
    socket.getaddrinfo, socket.create_connection = getaddrinfo, create_connection


def uninstall():
    "Undo `install` in this process."
    if not _orig: return
    socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto = _orig['connect'], _orig['connect_ex'], _orig['sendto']
    socket.getaddrinfo, socket.create_connection = _orig['getaddrinfo'], _orig['create_connection']
    _orig.clear()


if os.environ.get('SM_NONET') == '1': install()
