"""Reading TVM's binary serialization: little-endian u64s, and u64-length-prefixed byte strings (the packed
imports of a library, a device module's function table)."""

from __future__ import annotations

import struct


class BlobReader:
    def __init__(self, data: bytes, offset: int = 0):
        self.data, self.offset = data, offset

    def u64(self) -> int:
        (value,) = struct.unpack_from("<Q", self.data, self.offset)
        self.offset += 8
        return value

    def bytes(self) -> bytes:
        n = self.u64()
        self.offset += n
        return self.data[self.offset - n:self.offset]

    def string(self) -> str:
        return self.bytes().decode()

    def words(self) -> list[bytes]:
        """A vector of 4-byte entries (argument dtypes, argument tags)."""
        count = self.u64()  # read before the offset is: `offset += 4 * u64()` would lose the count's 8 bytes
        start = self.offset
        self.offset += 4 * count
        return [self.data[start + 4 * i:start + 4 * i + 4] for i in range(count)]

    def skip_words(self) -> None:
        self.words()

    def function_table(self) -> dict[str, tuple[list[bytes], list[str]]]:
        """A device module's function table: {kernel: (argument dtypes as DLDataType bytes, launch
        parameter tags such as blockIdx.x, threadIdx.x)}."""
        table = {}
        for _ in range(self.u64()):
            self.bytes()  # the table's key: the kernel's name again
            name = self.string()
            arg_types = self.words()
            tags = [self.string() for _ in range(self.u64())]
            self.skip_words()  # argument extra tags
            table[name] = (arg_types, tags)
        return table
