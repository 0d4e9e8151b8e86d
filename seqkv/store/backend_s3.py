"""S3 backend (``s3://bucket/prefix``) through boto3.

Each entry is one object ``entries/<key>`` written by a single ``put_object`` with ``IfNoneMatch="*"`` (a
conditional create: S3 refuses it when the object exists); where the server ignores the condition, two
writers of the same key write the same bytes under one name, so nothing is duplicated either.  Last use
is kept in the object's ``last-used`` metadata, refreshed by an in-place ``copy_object``.  Side records
are small objects under ``meta/``; an entry is set aside by copying it under ``quarantine/`` or ``limbo/``
and deleting it (S3 has no rename: a reader may meet it in both places for a moment, never in neither).
Options: endpoint_url, aws_access_key_id, aws_secret_access_key, region_name (and any other boto3
client keyword).  Needs boto3, imported when a backend is opened.
"""
from __future__ import annotations

import time
from urllib.parse import urlparse

from ..errors import ConfigError, StorageError
from .backend import (
    AREAS, ENTRIES, KEY_RE, META_FOLDER_RE, META_NAME_RE, Backend, aside_address, register_backend,
)

_MISSING = ("NoSuchKey", "404", "NotFound")


@register_backend("s3")
class S3Backend(Backend):
    name = "s3"

    def __init__(self, url: str, **options):
        try:
            import boto3
            import botocore.exceptions
        except ImportError as exc:
            raise StorageError("the s3 backend needs boto3 (pip install boto3)") from exc
        self._ClientError = botocore.exceptions.ClientError
        self._errors = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError)
        try:
            parsed = urlparse(url)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid s3 URL {url!r}: {exc}") from None
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ConfigError(f"not an s3://bucket/prefix URL: {url!r}")
        self.bucket = parsed.netloc
        prefix = parsed.path.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        try:
            self.client = boto3.session.Session().client("s3", **options)
        except (TypeError, ValueError) as exc:  # an option boto3 does not know, an invalid endpoint URL
            raise ConfigError(f"cannot create the S3 client with options {sorted(options)}: {exc}") from None
        except self._errors as exc:
            raise StorageError(f"cannot create the S3 client: {exc}") from exc

    @classmethod
    def from_url(cls, url: str, *, fsync: bool = False, **options) -> S3Backend:
        return cls(url, **options)

    def _k(self, key: str) -> str:
        if not KEY_RE.match(key):
            raise StorageError(f"invalid entry key {key!r}")
        return f"{self.prefix}entries/{key}"

    def _head(self, area: str) -> str:
        """The object key prefix of an area's items (``entries/``, ``quarantine/``, ``limbo/``)."""
        if area not in AREAS:
            raise StorageError(f"unknown area {area!r}")
        return f"{self.prefix}{area}/"

    def _item(self, area: str, name: str) -> str:
        return self._k(name) if area == ENTRIES else aside_address(self._head(area), area, name)

    def _code(self, exc) -> str:
        if isinstance(exc, self._ClientError):
            return str(exc.response.get("Error", {}).get("Code", ""))
        return ""

    def _get_object(self, object_key: str, what: str):
        try:
            return self.client.get_object(Bucket=self.bucket, Key=object_key)["Body"].read()
        except self._errors as exc:
            if self._code(exc) in _MISSING:
                return None
            raise StorageError(f"S3 get of {what} failed: {exc}") from exc

    def get(self, key: str):
        return self._get_object(self._k(key), f"entry {key}")

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._k(key))
            return True
        except self._errors as exc:
            if self._code(exc) in _MISSING:
                return False
            raise StorageError(f"S3 head of entry {key} failed: {exc}") from exc

    def put_if_absent(self, key: str, data: bytes) -> bool:
        if self.exists(key):
            return False
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, IfNoneMatch="*",
                                   Metadata={"last-used": repr(time.time())})
            return True
        except self._errors as exc:
            if self._code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            raise StorageError(f"S3 put of entry {key} failed: {exc}") from exc

    def _delete_object(self, object_key: str, what: str) -> bool:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=object_key)
            return True
        except self._errors as exc:
            raise StorageError(f"S3 delete of {what} failed: {exc}") from exc

    def delete(self, name: str, area: str = ENTRIES) -> bool:
        return self._delete_object(self._item(area, name), f"{area} item {name}")

    def touch(self, key: str, when: float) -> None:
        k = self._k(key)
        try:
            self.client.copy_object(Bucket=self.bucket, Key=k, CopySource={"Bucket": self.bucket, "Key": k},
                                    Metadata={"last-used": repr(when)}, MetadataDirective="REPLACE")
        except self._errors as exc:
            if self._code(exc) in _MISSING:
                return
            raise StorageError(f"S3 touch of entry {key} failed: {exc}") from exc

    def _list_objects(self, prefix: str):
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                yield from page.get("Contents", [])
        except self._errors as exc:
            raise StorageError(f"S3 list failed: {exc}") from exc

    def list(self, area: str = ENTRIES) -> list:
        head = self._head(area)
        out = []
        for obj in self._list_objects(head):
            name, last = obj["Key"][len(head):], obj["LastModified"].timestamp()
            if area != ENTRIES:
                out.append((name, int(obj["Size"]), last))
                continue
            if not KEY_RE.match(name):
                continue
            try:
                meta = self.client.head_object(Bucket=self.bucket, Key=obj["Key"]).get("Metadata", {})
                last = float(meta.get("last-used", last))
            except (self._errors, ValueError):
                continue  # deleted meanwhile
            out.append((name, int(obj["Size"]), last))
        return out

    def move(self, area: str, name: str, to_area: str, to_name: str):
        src, dst = self._item(area, name), self._item(to_area, to_name)
        # back among the entries: like put_if_absent, refuse an entry that exists (where the copy races a
        # writer, both hold the same bytes for the same key)
        if to_area == ENTRIES and self.exists(to_name):
            return None
        try:
            self.client.copy_object(Bucket=self.bucket, Key=dst, CopySource={"Bucket": self.bucket, "Key": src})
        except self._errors as exc:
            if self._code(exc) in _MISSING:
                return None
            raise StorageError(f"cannot move {area} item {name} to {to_area}: {exc}") from exc
        self._delete_object(src, f"{area} item {name}")
        return dst

    # -- side records ------------------------------------------------------------------------
    def _m(self, name: str) -> str:
        if not META_NAME_RE.match(name):
            raise StorageError(f"invalid side record name {name!r}")
        return f"{self.prefix}meta/{name}"

    def meta_set(self, name: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._m(name), Body=data)
        except self._errors as exc:
            raise StorageError(f"S3 put of side record {name} failed: {exc}") from exc

    def meta_get(self, name: str):
        return self._get_object(self._m(name), f"side record {name}")

    def meta_delete(self, name: str) -> bool:
        return self._delete_object(self._m(name), f"side record {name}")

    def meta_list(self, folder: str) -> list:
        if not META_FOLDER_RE.match(folder):
            raise StorageError(f"invalid side record folder {folder!r}")
        head = f"{self.prefix}meta/{folder}/"
        return sorted({o["Key"][len(head):].split("/", 1)[0] for o in self._list_objects(head)} - {""})
