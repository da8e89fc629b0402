"""A guard on numba's disk cache for the processes of one test run that share one cache
directory: the pytest-xdist workers (``tests/conftest.py`` applies it in each). Imports nothing
but numba's cache module, so that a child process can take it cheaply
(``tests/test_suite_machinery.py``).
"""

import itertools

__all__ = ["serialize_cache_saves"]


def serialize_cache_saves():
    """Make numba's cache saves safe across the processes that share one cache directory.

    Every generated loop of the numba backend is one function to numba's cache (one source
    file, one qualified name), so all variants share one index file, and numba's
    ``IndexDataCacheFile.save`` reads the index, picks the first free data file number, writes
    the index, then the data, with no lock: two workers saving two variants at once both pick
    the same number, and one variant's key ends up pointing at the other's machine code (a
    later load runs the wrong variant, or fails to unbox its arguments). Here a save holds an
    exclusive ``flock`` on a file beside the index, and writes the data before the index entry
    that names it. A test-suite guard only: the library's own use of the cache across processes
    is not changed by it."""
    try:
        import fcntl

        from numba.core import caching
    except ImportError:
        return
    cls = getattr(caching, "IndexDataCacheFile", None)
    needed = ("_load_index", "_save_index", "_save_data", "_data_name")
    if cls is None or getattr(cls.save, "_serialized", False):
        return
    if not all(hasattr(cls, n) for n in needed):
        return

    def save(self, key, data):
        with open(self._index_path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                overloads = self._load_index()
                name = overloads.get(key)
                if name is None:
                    used = set(overloads.values())
                    name = next(
                        self._data_name(i)
                        for i in itertools.count(1)
                        if self._data_name(i) not in used
                    )
                self._save_data(name, data)
                if overloads.get(key) != name:
                    overloads[key] = name
                    self._save_index(overloads)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    save._serialized = True
    cls.save = save
