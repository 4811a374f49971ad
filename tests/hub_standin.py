"""A local stand-in for the Hugging Face Hub: the HTTP endpoints the real ``huggingface_hub`` client calls to
create a model repo, upload files in one commit (regular files inline, large/binary files through the git-LFS
"basic" transfer) and download them, so tests can run ``HF_ENDPOINT=<stand-in>`` end to end without a network.

Served (model repos only)::

    POST /api/repos/create                                   create_repo (409 + url when it exists)
    POST /api/validate-yaml                                  README front matter check before a commit
    GET  /api/models/{ns}/{name}[/revision/{rev}]            repo_info / model_info
    POST /api/models/{ns}/{name}/preupload/{rev}             upload mode per file ("regular" or "lfs")
    POST /{ns}/{name}.git/info/lfs/objects/batch             LFS batch API, "basic" transfer only
    PUT  /_lfs/{oid}            POST /_lfs/{oid}/verify      LFS object upload (sha256 and size checked)
    POST /api/models/{ns}/{name}/commit/{rev}                ndjson commit (header, file, lfsFile, deletedFile)
    HEAD|GET /{ns}/{name}/resolve/{rev}/{path}               download (ETag, X-Repo-Commit, X-Linked-*)

Not served: the Xet storage protocol (``hf_xet`` talks to a separate CAS service), so uploads must run with
``HF_HUB_DISABLE_XET=1`` (the client then uses git-LFS); multipart LFS; pull requests; branches other than main.

Bounded and safe for a test run: it binds to the loopback interface only, refuses bodies over ``max_body`` bytes,
more than ``max_repos`` repos or ``max_bytes`` stored, and stops by itself after ``max_lifetime`` seconds (and
after ``idle_timeout`` seconds without a request). Writes need ``Authorization: Bearer <token>``; private repos
need it to be read. ``fail`` injects HTTP 500 answers (``{'commit': 1}`` fails the next commit once).

Hostile modes for download tests (keys ``'ORG/NAME/path'``): ``flaky[key] = (n, status)`` answers the first ``n``
requests (HEAD or GET) for that file normally and every later one with ``status`` (404 as "entry not found", 500,
...); ``corrupt`` (a set of keys) serves the file with its last byte flipped under the original ETag /
X-Linked-Etag / X-Linked-Size, as a bad mirror or a bit flip in transit would. :meth:`seed` puts files into a repo
directly (one commit), without going through the HTTP API.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Set, Tuple
from urllib.parse import unquote, urlsplit

__all__ = ['HubStandIn']

_REPO = r'(?P<repo>[\w.\-]+/[\w.\-]+)'
_ROUTES = [
    ('POST', re.compile(r'^/api/repos/create$'), 'create'),
    ('POST', re.compile(r'^/api/validate-yaml$'), 'validate_yaml'),
    ('GET', re.compile(r'^/api/whoami-v2$'), 'whoami'),
    ('POST', re.compile(rf'^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$'), 'preupload'),
    ('POST', re.compile(rf'^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$'), 'commit'),
    ('GET', re.compile(rf'^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$'), 'info'),
    ('POST', re.compile(rf'^/{_REPO}\.git/info/lfs/objects/batch$'), 'lfs_batch'),
    ('PUT', re.compile(r'^/_lfs/(?P<oid>[0-9a-f]{64})$'), 'lfs_put'),
    ('POST', re.compile(r'^/_lfs/(?P<oid>[0-9a-f]{64})/verify$'), 'lfs_verify'),
    ('HEAD', re.compile(rf'^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$'), 'resolve'),
    ('GET', re.compile(rf'^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$'), 'resolve'),
]


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


class _Reply(Exception):
    def __init__(self, status: int, body=None, headers: Optional[Dict[str, str]] = None):
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


class HubStandIn:
    """The stand-in server; use as a context manager: ``with HubStandIn(token='t') as hub: hub.url``."""

    def __init__(self, token: str, max_body: int = 16 << 20, max_bytes: int = 64 << 20, max_repos: int = 16,
                 max_lifetime: float = 120.0, idle_timeout: float = 60.0, lfs_min_size: int = 10 << 20):
        self.token = token
        self.max_body, self.max_bytes, self.max_repos = max_body, max_bytes, max_repos
        self.max_lifetime, self.idle_timeout, self.lfs_min_size = max_lifetime, idle_timeout, lfs_min_size
        self.repos: Dict[str, dict] = {}
        self.lfs: Dict[str, bytes] = {}
        self.log: List[tuple] = []          # (method, path, status, authorized)
        self.fail: Dict[str, int] = {}
        self.flaky: Dict[str, Tuple[int, int]] = {}   # 'org/name/path' -> (requests served, then this status)
        self.corrupt: Set[str] = set()                 # 'org/name/path' served with altered bytes, original etag
        self.served: Dict[str, int] = {}               # 'org/name/path' -> resolve requests so far
        self._lock = threading.RLock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._last = time.monotonic()
        self._stopped = threading.Event()

    # ----- life cycle -----
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f'http://{host}:{port}'

    def start(self) -> 'HubStandIn':
        outer = self

        class Handler(_Handler):
            hub = outer

        self._server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={'poll_interval': 0.1}, daemon=True).start()
        threading.Thread(target=self._watchdog, daemon=True).start()
        return self

    def _watchdog(self) -> None:
        t0 = time.monotonic()
        while not self._stopped.wait(0.5):
            now = time.monotonic()
            if now - t0 > self.max_lifetime or now - self._last > self.idle_timeout:
                self.stop()

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._server is not None:
            threading.Thread(target=self._server.shutdown, daemon=True).start()
            self._server.server_close()

    def __enter__(self) -> 'HubStandIn':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----- state helpers (also used by the tests) -----
    def files(self, repo_id: str, revision: str = 'main') -> Dict[str, bytes]:
        """``{path: bytes}`` of a repo at a revision (a commit oid or 'main')."""
        with self._lock:
            repo = self.repos[repo_id]
            commit = self._commit(repo, revision)
            return {p: self._content(ref) for p, ref in commit['files'].items()}

    def seed(self, repo_id: str, files: Dict[str, bytes], private: bool = False) -> str:
        """Add one commit holding ``files`` to ``repo_id`` (created if needed; ``*.safetensors``, ``*.bin`` and
        files with a NUL byte are stored as LFS, the rest in git); returns the commit oid."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, {'private': private, 'commits': [
                {'oid': hashlib.sha1(repo_id.encode()).hexdigest(), 'files': {}, 'summary': 'initial commit'}]})
            parent = repo['commits'][-1]
            tree = dict(parent['files'])
            for path, data in files.items():
                if path.endswith(('.safetensors', '.bin')) or b'\0' in data:
                    oid = hashlib.sha256(data).hexdigest()
                    self.lfs[oid] = data
                    tree[path] = ('lfs', oid)
                else:
                    tree[path] = ('regular', data)
            oid = hashlib.sha1(parent['oid'].encode() + json.dumps(sorted(files)).encode()).hexdigest()
            repo['commits'].append({'oid': oid, 'files': tree, 'summary': 'seeded', 'operations': sorted(files)})
            return oid

    def commits(self, repo_id: str) -> List[dict]:
        with self._lock:
            return [dict(c) for c in self.repos[repo_id]['commits']]

    def _commit(self, repo: dict, rev: str) -> dict:
        rev = unquote(rev)
        if rev == 'main':
            return repo['commits'][-1]
        for c in repo['commits']:
            if c['oid'] == rev:
                return c
        raise _Reply(404, {'error': f'Invalid rev id: {rev}'}, {'X-Error-Code': 'RevisionNotFound'})

    def _content(self, ref: tuple) -> bytes:
        kind, value = ref
        return self.lfs[value] if kind == 'lfs' else value

    def _stored_bytes(self) -> int:
        n = sum(len(v) for v in self.lfs.values())
        for r in self.repos.values():
            for c in r['commits']:
                n += sum(len(v) for k, v in c['files'].values() if k == 'regular')
        return n


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandIn
    protocol_version = 'HTTP/1.1'

    def log_message(self, *args) -> None:  # quiet
        pass

    # ----- plumbing -----
    def _dispatch(self, method: str) -> None:
        hub = self.hub
        hub._last = time.monotonic()
        path = urlsplit(self.path).path
        status, body, headers = 404, {'error': f'stand-in: no route for {method} {path}'}, {}
        authorized = self._authorized()
        try:
            for m, rx, name in _ROUTES:
                match = rx.match(path)
                if m == method and match:
                    with hub._lock:
                        if hub.fail.get(name):
                            hub.fail[name] -= 1
                            raise _Reply(500, {'error': f'stand-in: injected failure of {name}'})
                    raw = self._body()
                    status, body, headers = 200, *getattr(self, '_' + name)(raw, **match.groupdict())
                    break
        except _Reply as r:
            status, body, headers = r.status, r.body, r.headers
        if status >= 400:
            self.close_connection = True  # an unread body must not be taken for the next request
        with hub._lock:
            hub.log.append((method, path, status, authorized))
        self._send(status, body, headers, head=method == 'HEAD')

    def _body(self) -> bytes:
        n = int(self.headers.get('Content-Length') or 0)
        if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b';')[0].strip() or b'0', 16)
                if size == 0:
                    self.rfile.readline()
                    break
                total += size
                if total > self.hub.max_body:
                    raise _Reply(413, {'error': 'stand-in: body too large'})
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b''.join(chunks)
        if n > self.hub.max_body:
            self.close_connection = True
            raise _Reply(413, {'error': 'stand-in: body too large'})
        return self.rfile.read(n) if n else b''

    def _send(self, status: int, body, headers: Dict[str, str], head: bool = False) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
        self.send_response(status)
        if not isinstance(body, bytes):
            self.send_header('Content-Type', 'application/json')
        for k, v in headers.items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header('Connection', 'close')  # so the client does not reuse a connection closed here
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _authorized(self) -> bool:
        return self.headers.get('Authorization', '') == f'Bearer {self.hub.token}'

    def _need_auth(self) -> None:
        if not self._authorized():
            raise _Reply(401, {'error': 'Invalid username or password.'})

    def _repo(self, repo_id: str, write: bool = False) -> dict:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo['private'] and not self._authorized()):
            raise _Reply(404, {'error': 'Repository not found'}, {'X-Error-Code': 'RepoNotFound'})
        if write:
            self._need_auth()
        return repo

    def _json(self, raw: bytes):
        try:
            return json.loads(raw or b'{}')
        except json.JSONDecodeError:
            raise _Reply(400, {'error': 'stand-in: body is not JSON'}) from None

    do_GET = lambda self: self._dispatch('GET')  # noqa: E731
    do_HEAD = lambda self: self._dispatch('HEAD')  # noqa: E731
    do_POST = lambda self: self._dispatch('POST')  # noqa: E731
    do_PUT = lambda self: self._dispatch('PUT')  # noqa: E731

    # ----- endpoints: each returns (body, headers) -----
    def _create(self, raw):
        self._need_auth()
        p = self._json(raw)
        if p.get('type', 'model') not in (None, 'model'):
            raise _Reply(400, {'error': 'stand-in: model repos only'})
        repo_id = f"{p.get('organization') or 'user'}/{p['name']}"
        url = f'{self.hub.url}/{repo_id}'
        with self.hub._lock:
            if repo_id in self.hub.repos:
                raise _Reply(409, {'error': 'You already created this model repo', 'url': url})
            if len(self.hub.repos) >= self.hub.max_repos:
                raise _Reply(507, {'error': 'stand-in: too many repos'})
            private = p.get('visibility') == 'private' or bool(p.get('private'))
            init = {'oid': hashlib.sha1(repo_id.encode()).hexdigest(), 'files': {}, 'summary': 'initial commit'}
            self.hub.repos[repo_id] = {'private': private, 'commits': [init]}
        return {'url': url, 'name': repo_id, 'id': repo_id}, {}

    def _validate_yaml(self, raw):
        p = self._json(raw)
        text = p.get('content', '')
        if text.startswith('---') and text.count('\n---', 3) < 1:
            raise _Reply(400, {'error': 'stand-in: README front matter is not closed by ---'})
        return {'errors': [], 'warnings': []}, {}

    def _whoami(self, raw):
        self._need_auth()
        return {'type': 'user', 'name': 'user', 'orgs': []}, {}

    def _info(self, raw, repo, rev=None):
        r = self._repo(repo)
        c = self.hub._commit(r, rev or 'main')
        return {'id': repo, 'modelId': repo, 'sha': c['oid'], 'private': r['private'], 'tags': [],
                'siblings': [{'rfilename': f} for f in sorted(c['files'])], 'downloads': 0, 'likes': 0}, {}

    def _preupload(self, raw, repo, rev):
        r = self._repo(repo, write=True)
        head = self.hub._commit(r, rev)['files']
        out = []
        for f in self._json(raw).get('files', []):
            sample = base64.b64decode(f.get('sample', ''))
            lfs = f['size'] >= self.hub.lfs_min_size or b'\0' in sample or f['path'].endswith('.safetensors')
            oid = None
            if f['path'] in head:
                kind, value = head[f['path']]
                oid = value if kind == 'lfs' else git_blob_sha1(value)
            out.append({'path': f['path'], 'uploadMode': 'lfs' if lfs else 'regular', 'shouldIgnore': False,
                        'oid': oid})
        return {'files': out, 'commitOid': self.hub._commit(r, rev)['oid']}, {}

    def _lfs_batch(self, raw, repo):
        self._repo(repo, write=True)
        p = self._json(raw)
        if p.get('operation') != 'upload' or 'basic' not in p.get('transfers', ['basic']):
            raise _Reply(422, {'message': 'stand-in: only basic LFS uploads'})
        objects = []
        for o in p.get('objects', []):
            obj = {'oid': o['oid'], 'size': o['size'], 'authenticated': True}
            if o['oid'] not in self.hub.lfs:
                base = f"{self.hub.url}/_lfs/{o['oid']}"
                obj['actions'] = {'upload': {'href': base}, 'verify': {'href': base + '/verify'}}
            objects.append(obj)
        return {'transfer': 'basic', 'objects': objects, 'hash_algo': 'sha256'}, {}

    def _lfs_put(self, raw, oid):
        if hashlib.sha256(raw).hexdigest() != oid:
            raise _Reply(400, {'error': 'stand-in: uploaded bytes do not hash to the oid'})
        with self.hub._lock:
            if self.hub._stored_bytes() + len(raw) > self.hub.max_bytes:
                raise _Reply(507, {'error': 'stand-in: storage full'})
            self.hub.lfs[oid] = raw
        return {}, {'ETag': f'"{oid}"'}

    def _lfs_verify(self, raw, oid):
        self._need_auth()
        p = self._json(raw)
        if oid not in self.hub.lfs or len(self.hub.lfs[oid]) != p.get('size'):
            raise _Reply(404, {'error': 'stand-in: object missing or of another size'})
        return {}, {}

    def _commit(self, raw, repo, rev):
        r = self._repo(repo, write=True)
        lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
        if not lines or lines[0].get('key') != 'header':
            raise _Reply(400, {'error': 'stand-in: commit payload must start with a header line'})
        with self.hub._lock:
            parent = self.hub._commit(r, rev)
            files = dict(parent['files'])
            for item in lines[1:]:
                key, v = item.get('key'), item.get('value', {})
                if key == 'file':
                    files[v['path']] = ('regular', base64.b64decode(v['content']))
                elif key == 'lfsFile':
                    if v['oid'] not in self.hub.lfs:
                        raise _Reply(422, {'error': f"stand-in: LFS object {v['oid']} for {v['path']} was not "
                                                    f"uploaded"})
                    files[v['path']] = ('lfs', v['oid'])
                elif key == 'deletedFile':
                    files.pop(v['path'], None)
                else:
                    raise _Reply(400, {'error': f'stand-in: unsupported commit operation {key!r}'})
            if self.hub._stored_bytes() > self.hub.max_bytes:
                raise _Reply(507, {'error': 'stand-in: storage full'})
            digest = hashlib.sha1(parent['oid'].encode() + json.dumps(
                {p: (k, v if k == 'lfs' else git_blob_sha1(v)) for p, (k, v) in sorted(files.items())}).encode() +
                json.dumps(lines[0]['value']).encode())
            commit = {'oid': digest.hexdigest(), 'files': files, 'summary': lines[0]['value'].get('summary', ''),
                      'operations': [i['key'] for i in lines[1:]]}
            r['commits'].append(commit)
        return {'commitUrl': f"{self.hub.url}/{repo}/commit/{commit['oid']}", 'commitOid': commit['oid'],
                'pullRequestUrl': None}, {}

    def _resolve(self, raw, repo, rev, path):
        r = self._repo(repo)
        c = self.hub._commit(r, rev)
        path = unquote(path)
        if path not in c['files']:
            raise _Reply(404, {'error': f'Entry not found: {path}'}, {'X-Error-Code': 'EntryNotFound',
                                                                     'X-Repo-Commit': c['oid']})
        key = f'{repo}/{path}'
        with self.hub._lock:
            n = self.hub.served[key] = self.hub.served.get(key, 0) + 1
            flaky = self.hub.flaky.get(key)
            corrupt = key in self.hub.corrupt
        if flaky is not None and n > flaky[0]:
            status = flaky[1]
            raise _Reply(status, {'error': f'stand-in: flaky answer {status} for {path}'},
                         {'X-Error-Code': 'EntryNotFound', 'X-Repo-Commit': c['oid']} if status == 404 else {})
        kind, value = c['files'][path]
        data = self.hub._content((kind, value))
        etag_data = data
        if corrupt and data:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])  # same size, same etag, other bytes
        headers = {'X-Repo-Commit': c['oid'], 'Accept-Ranges': 'none'}
        if kind == 'lfs':
            headers.update({'ETag': f'"{value}"', 'X-Linked-Etag': f'"{value}"', 'X-Linked-Size': str(len(data))})
        else:
            headers['ETag'] = f'"{git_blob_sha1(etag_data)}"'
        return data, headers
