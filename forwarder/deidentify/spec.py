"""What a destination asks to be redacted: parsed and validated once, at start-up."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from stowaway.forwarder.deidentify.profiles import (
    MAPPED_UIDS,
    REQUIRED,
    Action,
    chc_basic_tags,
    dicom_basic,
)
from stowaway.forwarder.deidentify.tags import (
    TagError,
    format_tag,
    parse_google_tag,
    parse_tags,
    split_google_list,
)
from stowaway.forwarder.deidentify.uids import UidScheme

__all__ = ["Mode", "RedactionConfigError", "RedactionSpec"]

PIXEL_DATA = 0x7FE00010
GOOGLE_REMOVE_FLAG = "--redact_remove_list"
GOOGLE_KEEP_FLAG = "--redact_keep_list"
GOOGLE_PROFILE_FLAG = "--redact_filter_profile"
# Java's TagFilterProfile.valueOf: exact names; Google's proto says UNSPECIFIED means CHC_BASIC.
_GOOGLE_PROFILE_NAMES = {"CHC_BASIC": "CHC_BASIC", "TAG_FILTER_PROFILE_UNSPECIFIED": "CHC_BASIC"}


class RedactionConfigError(ValueError):
    """A redaction setting that cannot work; the message is one line naming the setting."""


class Mode(enum.Enum):
    REMOVE_LIST = "remove"
    KEEP_LIST = "keep"
    CHC_BASIC = "CHC_BASIC"
    DICOM_BASIC = "DICOM_BASIC"


@dataclass(frozen=True)
class RedactionSpec:
    """One destination's redaction.

    * ``REMOVE_LIST``: each listed tag is emptied (zero length, as Google's remove list
      does, so a Type 2 attribute stays valid), at any depth.
    * ``KEEP_LIST``: top-level elements not listed are removed, except ``profiles.REQUIRED``
      (SOP Class/Instance, Study and Series Instance UIDs, Modality, Specific Character Set,
      the Image Pixel module: SamplesPerPixel, PhotometricInterpretation, Rows, Columns,
      BitsAllocated, BitsStored, HighBit, PixelRepresentation, PlanarConfiguration,
      NumberOfFrames, palettes, ICC profile, and PixelData/FloatPixelData/
      DoubleFloatPixelData with their offset tables). A kept sequence is kept whole.
    * ``CHC_BASIC``: Google's 286 keywords, emptied at any depth; everything else,
      private tags included, kept (as Google's profile does).
    * ``DICOM_BASIC``: PS3.15 Annex E Basic Profile at any depth, private tags removed;
      ``retain_dates`` applies the Retain Longitudinal Temporal Information with Full Dates
      Option. UIDs are never retained.

    In every mode the identifying UIDs (``profiles.MAPPED_UIDS``: Study, Series, SOP
    Instance, Frame of Reference, Media Storage SOP Instance and every UID that refers to
    one of them, at any depth) are replaced by ``uid_scheme``'s mapping, never removed.
    """

    mode: Mode
    tags: frozenset[int] = frozenset()
    retain_dates: bool = False
    uid_scheme: UidScheme = UidScheme.KEYED
    uid_key_file: Path | None = None
    _where: str = field(default="redact", compare=False, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def name(self) -> str:
        """Short name for reports: ``DICOM_BASIC+retain_dates``, ``remove_list``..."""
        base = {Mode.REMOVE_LIST: "remove_list", Mode.KEEP_LIST: "keep_list"}.get(
            self.mode, self.mode.value
        )
        return base + ("+retain_dates" if self.retain_dates else "")

    def validate(self) -> None:
        """Raise ``RedactionConfigError`` for a spec that cannot give a valid instance."""
        where = self._where
        if self.retain_dates and self.mode is not Mode.DICOM_BASIC:
            raise RedactionConfigError(f"{where}: retain_dates applies to profile DICOM_BASIC only")
        if self.tags and self.mode not in (Mode.REMOVE_LIST, Mode.KEEP_LIST):
            raise RedactionConfigError(f"{where}: a profile takes no tag list")
        if self.mode is Mode.REMOVE_LIST:
            # Listed UIDs are mapped, not emptied (as in Google's redactor), and PixelData may
            # go (Google allows it); any other element the instance needs may not.
            needed = sorted(self.tags & (REQUIRED - MAPPED_UIDS - {PIXEL_DATA}))
            if needed:
                raise RedactionConfigError(
                    f"{where}: the remove list names {format_tag(needed[0])}, which the "
                    "instance needs to stay valid"
                )
        if self.uid_scheme is UidScheme.KEYED and self.uid_key_file is None:
            raise RedactionConfigError(
                f"{where}: uid_key_file is required for uid_scheme keyed "
                "(or set uid_scheme: google)"
            )

    def top_level_action(self, tag: int) -> Action | None:
        """For keep lists: the top-level decision (None: use ``action``)."""
        if self.mode is not Mode.KEEP_LIST:
            return None
        if tag in MAPPED_UIDS:
            return Action.MAP_UID
        if tag in self.tags or tag in REQUIRED:
            return Action.KEEP
        return Action.REMOVE

    def action(self, tag: int) -> Action:
        """The action for ``tag`` at any depth (inside a kept keep-list sequence: KEEP)."""
        if tag in MAPPED_UIDS:
            return Action.MAP_UID
        if self.mode is Mode.REMOVE_LIST:
            return Action.EMPTY if tag in self.tags else Action.KEEP
        if self.mode is Mode.CHC_BASIC:
            return Action.EMPTY if tag in chc_basic_tags() else Action.KEEP
        if self.mode is Mode.DICOM_BASIC:
            return dicom_basic().action(tag, retain_dates=self.retain_dates)
        return Action.KEEP

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_config(cls, config: Mapping[str, object], where: str = "redact") -> RedactionSpec:
        """From a destination's ``redact`` mapping.

        One of ``remove: [tags]``, ``keep: [tags]`` or ``profile: CHC_BASIC | DICOM_BASIC``
        (with ``retain_dates: true`` for DICOM_BASIC), plus ``uid_scheme: keyed | google``
        (default keyed) and ``uid_key_file: PATH`` (required for keyed).
        """
        known = {"remove", "keep", "profile", "retain_dates", "uid_scheme", "uid_key_file"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise RedactionConfigError(f"{where}: unknown setting {unknown[0]!r}")
        chosen = [k for k in ("remove", "keep", "profile") if k in config]
        if len(chosen) != 1:
            raise RedactionConfigError(f"{where}: give exactly one of remove, keep or profile")
        try:
            scheme = UidScheme(config.get("uid_scheme", "keyed"))
        except ValueError:
            raise RedactionConfigError(
                f"{where}.uid_scheme: {config.get('uid_scheme')!r} is not keyed or google"
            ) from None
        key_file = config.get("uid_key_file")
        if key_file is not None and not isinstance(key_file, str | Path):
            raise RedactionConfigError(f"{where}.uid_key_file: must be a path")
        retain_dates = config.get("retain_dates", False)
        if not isinstance(retain_dates, bool):
            raise RedactionConfigError(f"{where}.retain_dates: must be true or false")
        (kind,) = chosen
        common = {
            "retain_dates": retain_dates,
            "uid_scheme": scheme,
            "uid_key_file": Path(key_file) if key_file is not None else None,
            "_where": where,
        }
        if kind == "profile":
            profile = config["profile"]
            if profile not in ("CHC_BASIC", "DICOM_BASIC"):
                raise RedactionConfigError(
                    f"{where}.profile: {profile!r} is not CHC_BASIC or DICOM_BASIC"
                )
            return cls(Mode(profile), **common)  # type: ignore[arg-type]
        listed = config[kind]
        if not isinstance(listed, list | tuple):
            raise RedactionConfigError(f"{where}.{kind}: must be a list of tags")
        try:
            tags = parse_tags(listed, f"{where}.{kind}")
        except TagError as exc:
            raise RedactionConfigError(str(exc)) from None
        mode = Mode.REMOVE_LIST if kind == "remove" else Mode.KEEP_LIST
        return cls(mode, tags, **common)  # type: ignore[arg-type]

    @classmethod
    def from_google_flags(
        cls,
        remove_list: str = "",
        keep_list: str = "",
        filter_profile: str = "",
        *,
        uid_scheme: UidScheme = UidScheme.GOOGLE,
        uid_key_file: Path | None = None,
    ) -> RedactionSpec | None:
        """From Google's three flags, read exactly as its adapter reads them (None: no flag).

        At most one may be non-empty. Lists split on ``,`` like Java's ``String.split``
        (no trimming, trailing empty pieces dropped, so ``"a,"`` is ``[a]`` and an empty
        piece inside is an error). ``--redact_filter_profile`` takes ``CHC_BASIC`` (or
        ``TAG_FILTER_PROFILE_UNSPECIFIED``, which Google treats the same) and, beyond
        Google, ``DICOM_BASIC``.

        The UID scheme defaults to ``google`` here, so that a Google command line works
        unchanged and keeps deduplicating in the store Google's adapter filled; pass
        ``UidScheme.KEYED`` and a key file for UIDs nobody can confirm without the key.
        """
        given = [
            (flag, value)
            for flag, value in (
                (GOOGLE_REMOVE_FLAG, remove_list),
                (GOOGLE_KEEP_FLAG, keep_list),
                (GOOGLE_PROFILE_FLAG, filter_profile),
            )
            if value
        ]
        if not given:
            return None
        if len(given) > 1:
            raise RedactionConfigError(
                f"{given[0][0]} and {given[1][0]}: only one of the redact flags may be given"
            )
        ((flag, value),) = given
        common = {"uid_scheme": uid_scheme, "uid_key_file": uid_key_file, "_where": flag}
        if flag == GOOGLE_PROFILE_FLAG:
            profile = _GOOGLE_PROFILE_NAMES.get(value, value)
            if profile not in ("CHC_BASIC", "DICOM_BASIC"):
                raise RedactionConfigError(f"{flag}: {value!r} is not CHC_BASIC or DICOM_BASIC")
            return cls(Mode(profile), **common)  # type: ignore[arg-type]
        try:
            tags = frozenset(parse_google_tag(t, flag) for t in split_google_list(value))
        except TagError as exc:
            raise RedactionConfigError(str(exc)) from None
        mode = Mode.REMOVE_LIST if flag == GOOGLE_REMOVE_FLAG else Mode.KEEP_LIST
        return cls(mode, tags, **common)  # type: ignore[arg-type]
