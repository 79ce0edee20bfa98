"""What a browser is told about a stored file: type from the extension only, charset, sandbox."""

from __future__ import annotations

import pytest

from mogile_middleware.content import ContentPolicy, content_disposition

POLICY = ContentPolicy()


@pytest.mark.parametrize(("key", "media_type"), [
    pytest.param("a/b/photo.PNG", "image/png", id="upper-case-extension"),
    pytest.param("data:text/html,x.png", "image/png", id="data-url-key"),
    pytest.param("data:text/€,x", "application/octet-stream", id="data-url-without-extension"),
    pytest.param("page.html?x=.png", "image/png", id="a-question-mark-is-part-of-the-name"),
    pytest.param("dir.png/file", "application/octet-stream", id="extension-of-a-directory"),
    pytest.param(".png", "application/octet-stream", id="only-an-extension"),
    pytest.param("logs.tar.gz", "application/gzip", id="tar-gz"),
    pytest.param("logs.tgz", "application/gzip", id="tgz"),
    pytest.param("logs.tar", "application/x-tar", id="tar"),
    pytest.param("icon.svgz", "application/gzip", id="svgz"),
    pytest.param("font.woff2", "font/woff2", id="woff2"),
    pytest.param("pic.webp", "image/webp", id="webp"),
])
def test_media_type_comes_from_the_last_segments_extension(key: str, media_type: str) -> None:
    assert POLICY.media_type(key) == media_type


@pytest.mark.parametrize(("key", "content_type", "sandboxed"), [
    pytest.param("evil.html", "text/html; charset=utf-8", True, id="html"),
    pytest.param("evil.xhtml", "application/xhtml+xml; charset=utf-8", True, id="xhtml"),
    pytest.param("evil.svg", "image/svg+xml; charset=utf-8", True, id="svg"),
    pytest.param("evil.xml", "text/xml; charset=utf-8", True, id="xml"),
    pytest.param("feed.atom", "application/atom+xml; charset=utf-8", True, id="other-xml"),
    pytest.param("evil.js", "text/plain; charset=utf-8", False, id="javascript-as-text"),
    pytest.param("evil.mjs", "text/plain; charset=utf-8", False, id="module-as-text"),
    pytest.param("evil.css", "text/plain; charset=utf-8", False, id="stylesheet-as-text"),
    pytest.param("notes.txt", "text/plain; charset=utf-8", False, id="text"),
    pytest.param("data.json", "application/json; charset=utf-8", False, id="json"),
    pytest.param("photo.jpg", "image/jpeg", False, id="image"),
])
def test_users_files_cannot_run_script_by_default(key: str, content_type: str, sandboxed: bool) -> None:
    assert described(POLICY, key) == (content_type, sandboxed)
    assert "Content-Disposition" not in dict(POLICY.headers(key))


def described(policy: ContentPolicy, key: str) -> tuple[str, bool]:
    """The type ``policy`` gives ``key``'s answer, and whether it sandboxes it."""
    headers = dict(policy.headers(key))
    return headers["Content-Type"], headers.get("Content-Security-Policy") == "sandbox"


def test_trusted_files_are_served_as_they_are() -> None:
    policy = ContentPolicy(trusted_files=True)
    assert policy.headers("app.js") == [("Content-Type", "text/javascript; charset=utf-8")]
    assert policy.headers("index.html") == [("Content-Type", "text/html; charset=utf-8")]
    assert policy.headers("site.css") == [("Content-Type", "text/css; charset=utf-8")]


@pytest.mark.parametrize(("key", "content_type", "sandboxed"), [
    pytest.param("static/app.js", "text/javascript; charset=utf-8", False, id="script-of-the-site"),
    pytest.param("themes/dark/site.css", "text/css; charset=utf-8", False, id="stylesheet-of-the-site"),
    pytest.param("static/page.html", "text/html; charset=utf-8", False, id="page-of-the-site"),
    pytest.param("uploads/static/app.js", "text/plain; charset=utf-8", False, id="script-elsewhere"),
    pytest.param("staticfile.js", "text/plain; charset=utf-8", False, id="script-beside-the-prefix"),
    pytest.param("avatars/x.svg", "image/svg+xml; charset=utf-8", True, id="image-elsewhere"),
])
def test_files_under_trusted_prefixes_alone_are_served_as_they_are(key: str, content_type: str,
                                                                   sandboxed: bool) -> None:
    """Static files beside users' uploads: trusting all of them, the site's own scripts had to be
    sent as text (which browsers neither run nor apply), or every upload trusted."""
    assert described(ContentPolicy(trusted_files=["static/", "themes/"]), key) == (content_type, sandboxed)


@pytest.mark.parametrize(("key", "content_type"), [
    ("app.js", "text/plain; charset=utf-8"),  # every Python: RFC 9239's text/javascript, sent as text
    ("photo.avif", "image/avif"),  # Python 3.10 has none: application/octet-stream
    ("captions.vtt", "text/vtt; charset=utf-8"),  # <track> takes no other type; none in 3.10
    ("scan.bmp", "image/bmp"),  # image/x-ms-bmp in 3.10
    ("letter.rtf", "application/rtf"),  # text/rtf in 3.13
    ("song.ogg", "audio/ogg"),  # none before 3.14: a browser opening it downloaded it
    ("song.m4a", "audio/mp4"),
    ("film.mkv", "video/matroska"),
    ("font.ttf", "font/ttf"),
    ("sound.wav", "audio/x-wav"),  # audio/vnd.wave from 3.14
    ("film.avi", "video/x-msvideo"),  # video/vnd.avi from 3.14
])
def test_a_file_has_one_type_whatever_the_python(key: str, content_type: str) -> None:
    """Hosts of one site may run different Pythons, whose type tables differ: the type must not."""
    assert dict(POLICY.headers(key))["Content-Type"] == content_type


def test_charset_can_be_changed_or_dropped() -> None:
    latin = ContentPolicy(charset="iso-8859-1")
    assert dict(latin.headers("a.txt"))["Content-Type"] == "text/plain; charset=iso-8859-1"
    assert dict(ContentPolicy(charset=None).headers("a.txt"))["Content-Type"] == "text/plain"


def test_site_types_come_first_longest_ending_first() -> None:
    policy = ContentPolicy(mimetypes={".gz": "application/x-gzip", ".tar.gz": "application/x-gtar",
                                      ".avif": "image/x-avif"})
    assert policy.media_type("a.tar.gz") == "application/x-gtar"
    assert policy.media_type("a.gz") == "application/x-gzip"
    assert policy.media_type("A.AVIF") == "image/x-avif"


@pytest.mark.parametrize("media_type", ["text/x-javascript", "application/x-ecmascript", "text/jscript",
                                        "text/livescript", "text/javascript1.5", "text/x-ecmascript"])
def test_every_type_a_browser_runs_as_a_script_is_sent_as_text(media_type: str) -> None:
    """Browsers run each of the standard's JavaScript types from ``<script src>``, ``nosniff`` or not."""
    assert dict(ContentPolicy(mimetypes={".run": media_type}).headers("a.run"))["Content-Type"] == \
        "text/plain; charset=utf-8"


def test_a_site_type_written_in_capitals_gets_the_sandbox_of_its_type() -> None:
    policy = ContentPolicy(mimetypes={".page": "TEXT/HTML", ".run": "Application/JavaScript"})
    assert dict(policy.headers("a.page")) == {"Content-Type": "text/html; charset=utf-8",
                                              "Content-Security-Policy": "sandbox"}
    assert dict(policy.headers("a.run"))["Content-Type"] == "text/plain; charset=utf-8"


@pytest.mark.parametrize("mapping", [{"webp": "image/webp"}, {".webp": "webp"}, {".x": "text/€"},
                                     {".html": "text/html; charset=utf-8"}, {".x": "text/ html"}])
def test_bad_site_types_are_refused(mapping: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="mimetypes"):
        ContentPolicy(mimetypes=mapping)


@pytest.mark.parametrize(("key", "expected"), [
    pytest.param("dir/report.pdf", 'attachment; filename="report.pdf"', id="ascii"),
    pytest.param("café/naïve résumé.txt", "attachment; filename=\"na_ve r_sum_.txt\"; "
                 "filename*=UTF-8''na%C3%AFve%20r%C3%A9sum%C3%A9.txt", id="utf-8"),
    pytest.param('a"b\\c%d.txt', "attachment; filename=\"a_b_c_d.txt\"; filename*=UTF-8''a%22b%5Cc%25d.txt",
                 id="quotes-and-percent"),
    pytest.param("dir/", 'attachment; filename="download"', id="no-name"),
    pytest.param('report\r\nX-Header: y\u2028.pdf', "attachment; filename=\"reportX-Header: y.pdf\"", id="line-breaks"),
    pytest.param("invoice\u202egnp.exe", "attachment; filename=\"invoicegnp.exe\"", id="bidirectional-override"),
    pytest.param("\x07\u2066", 'attachment; filename="download"', id="nothing-shown"),
    pytest.param("می\u200cخواهم.txt", "attachment; filename=\"________.txt\"; "
                 "filename*=UTF-8''%D9%85%DB%8C%E2%80%8C%D8%AE%D9%88%D8%A7%D9%87%D9%85.txt", id="joiner-kept"),
])
def test_content_disposition_names_the_file_for_every_client(key: str, expected: str) -> None:
    assert content_disposition("attachment", key) == expected
    value = dict(ContentPolicy(content_disposition="attachment").headers(key))["Content-Disposition"]
    assert value == expected and value.isascii()


def test_unknown_disposition_is_refused() -> None:
    with pytest.raises(ValueError, match="content_disposition"):
        ContentPolicy(content_disposition="download")
