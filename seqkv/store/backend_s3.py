"""S3 backend (``s3://bucket/prefix``) through boto3.

Each entry is one object written by a single ``put_object`` with ``IfNoneMatch="*"`` (a conditional
create: S3 refuses it when the object exists); where the server ignores the condition, two writers of
the same key write the same bytes under one name, so nothing is duplicated either.  Last use is kept
in the object's ``last-used`` metadata, refreshed by an in-place ``copy_object``.
Side records (reference records, the content index, reuse scores) are small objects under
``meta/``; an evictor hides an entry by copying it under ``limbo/`` and deleting it.
Options: endpoint_url, aws_access_key_id, aws_secret_access_key, region_name (and any other boto3
client keyword).
"""
from __future__ import annotations

import re
import time
from urllib.parse import urlparse

from ..errors import StorageError
from .prefix_store import META_FOLDER_RE, META_NAME_RE, Backend

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


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
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StorageError(f"not an s3://bucket/prefix URL: {url!r}")
        self.bucket = parsed.netloc
        prefix = parsed.path.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        try:
            self.client = boto3.session.Session().client("s3", **options)
        except self._errors as exc:
            raise StorageError(f"cannot create the S3 client: {exc}") from exc

    def _k(self, key: str) -> str:
        if not _KEY_RE.match(key):
            raise StorageError(f"invalid entry key {key!r}")
        return f"{self.prefix}entries/{key}"

    def _code(self, exc) -> str:
        if isinstance(exc, self._ClientError):
            return str(exc.response.get("Error", {}).get("Code", ""))
        return ""

    def _get_object(self, object_key: str, what: str):
        try:
            return self.client.get_object(Bucket=self.bucket, Key=object_key)["Body"].read()
        except self._errors as exc:
            if self._code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise StorageError(f"S3 get of {what} failed: {exc}") from exc

    def get(self, key: str):
        return self._get_object(self._k(key), f"entry {key}")

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._k(key))
            return True
        except self._errors as exc:
            if self._code(exc) in ("NoSuchKey", "404", "NotFound"):
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

    def delete(self, key: str) -> bool:
        return self._delete_object(self._k(key), f"entry {key}")

    def touch(self, key: str, when: float) -> None:
        k = self._k(key)
        try:
            self.client.copy_object(Bucket=self.bucket, Key=k, CopySource={"Bucket": self.bucket, "Key": k},
                                    Metadata={"last-used": repr(when)}, MetadataDirective="REPLACE")
        except self._errors as exc:
            if self._code(exc) in ("NoSuchKey", "404", "NotFound"):
                return
            raise StorageError(f"S3 touch of entry {key} failed: {exc}") from exc

    def _list_objects(self, prefix: str):
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                yield from page.get("Contents", [])
        except self._errors as exc:
            raise StorageError(f"S3 list failed: {exc}") from exc

    def list(self):
        out = []
        base = f"{self.prefix}entries/"
        for obj in self._list_objects(base):
            key = obj["Key"][len(base):]
            if not _KEY_RE.match(key):
                continue
            last = obj["LastModified"].timestamp()
            try:
                meta = self.client.head_object(Bucket=self.bucket, Key=obj["Key"]).get("Metadata", {})
                last = float(meta.get("last-used", last))
            except (self._errors, ValueError):
                continue  # deleted meanwhile
            out.append((key, int(obj["Size"]), last))
        return out

    def _move_aside(self, key: str, dest: str, what: str) -> bool:
        """Copy the entry to ``dest``, then delete it; False when it was not there."""
        try:
            self.client.copy_object(Bucket=self.bucket, Key=dest, CopySource={"Bucket": self.bucket, "Key": self._k(key)})
        except self._errors as exc:
            if self._code(exc) in ("NoSuchKey", "404", "NotFound"):
                return False
            raise StorageError(f"cannot {what} entry {key}: {exc}") from exc
        self.delete(key)
        return True

    def quarantine(self, key: str) -> str:
        dest = f"{self.prefix}quarantine/{key}.{time.time_ns()}"
        return dest if self._move_aside(key, dest, "quarantine") else ""

    def quarantined(self) -> list[str]:
        return sorted(o["Key"] for o in self._list_objects(f"{self.prefix}quarantine/"))

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
        base = f"{self.prefix}meta/{folder}/"
        return sorted(o["Key"][len(base):] for o in self._list_objects(base))

    def ref_bases(self) -> list:
        base = f"{self.prefix}meta/refs/"
        return sorted({o["Key"][len(base):].split("/", 1)[0] for o in self._list_objects(base)} - {""})

    # -- eviction protocol ---------------------------------------------------------------------
    def hide(self, key: str):
        token = f"{self.prefix}limbo/{key}.{time.time_ns()}"
        return token if self._move_aside(key, token, "hide") else None

    def unhide(self, key: str, token) -> None:
        try:
            self.client.copy_object(Bucket=self.bucket, Key=self._k(key), CopySource={"Bucket": self.bucket, "Key": token})
            self.client.delete_object(Bucket=self.bucket, Key=token)
        except self._errors as exc:
            raise StorageError(f"cannot restore entry {key}: {exc}") from exc

    def drop_hidden(self, token) -> None:
        self._delete_object(token, f"hidden entry {token}")
