"""Tests of the config file and shell completion."""

import argparse
import io
import os
import shutil
import subprocess
import sys
import types

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import starget  # noqa: E402
from starget import ErrorCode, StargzError  # noqa: E402

C = P = starget


def usage_error(call, *args):
    with pytest.raises(StargzError) as info:
        call(*args)
    assert info.value.code == ErrorCode.USAGE
    return info.value.message


# =============================================================================
# parse_simple_yaml: accepted
# =============================================================================

SEED = "defaults:\n  concurrency: 8\nregistries:\n  mirror.internal:5000:\n    plain_http: true\n"


def test_seed_format():
    assert C.parse_simple_yaml(SEED) == {
        "defaults": {"concurrency": 8},
        "registries": {"mirror.internal:5000": {"plain_http": True}},
    }


def test_empty_documents():
    for text in ("", "\n\n", "# only a comment\n", "---\n", "--- # c\n\n", "   \n\t\n"):
        assert C.parse_simple_yaml(text) == {}


@pytest.mark.parametrize("text, value", [
    ("hello", "hello"), ("hello world", "hello world"), ("8", 8), ("-3", -3), ("+4", 4), ("0", 0),
    ("0755", "0755"), ("1.5", "1.5"), ("true", True), ("True", True), ("TRUE", True), ("yes", True),
    ("on", True), ("false", False), ("No", False), ("off", False), ("null", None), ("~", None),
    ("Null", None), ("'single'", "single"), ("'it''s'", "it's"), ("''", ""), ('""', ""),
    ('"a\\"b\\\\c\\nd\\te"', 'a"b\\c\nd\te'), ("'no \\n escapes'", "no \\n escapes"),
    ('"true"', "true"), ("'8'", "8"), ("'a: b'", "a: b"), ('"# not a comment"', "# not a comment"),
    ("a#b", "a#b"), ("value # comment", "value"), ("value\t# comment", "value"), ("'q' # c", "q"),
    ("http://host:5000/x", "http://host:5000/x"), ("linux/arm64/v8", "linux/arm64/v8"), ("-5x", "-5x"),
    ("C:\\certs\\ca.pem", "C:\\certs\\ca.pem"), ("  spaced  ", "spaced"), ("a'b\"c", "a'b\"c"),
])
def test_scalars(text, value):
    assert C.parse_simple_yaml("key: %s\n" % text) == {"key": value}


def test_empty_value_is_null():
    assert C.parse_simple_yaml("a:\nb:   # comment\nc: 1\nd:") == {"a": None, "b": None, "c": 1, "d": None}


def test_keys():
    text = ("mirror.internal:5000: 1\n"
            "\"[::1]:5000\": 2\n"
            "'quoted key': 3\n"
            "spaced   : 4\n"
            "tab:\tafter\n"
            "a#b: 5\n"
            "url:with:colons: 6\n"
            "true: 7\n"
            "8: eight\n")
    assert C.parse_simple_yaml(text) == {
        "mirror.internal:5000": 1, "[::1]:5000": 2, "quoted key": 3, "spaced": 4, "tab": "after",
        "a#b": 5, "url:with:colons": 6, "true": 7, "8": "eight"}


def test_nesting_comments_blank_lines_crlf_bom():
    text = ("\ufeff--- # the document\r\n"
            "# a comment\r\n"
            "top:\r\n"
            "\r\n"
            "    # an indented comment\r\n"
            "    middle:\r\n"
            "      inner: 1   # trailing\r\n"
            "      other: 'x'\r\n"
            "    back: 2\r\n"
            "  \t \r\n"
            "last: 3\r\n")
    assert C.parse_simple_yaml(text) == {"top": {"middle": {"inner": 1, "other": "x"}, "back": 2}, "last": 3}


def test_dedent_several_levels_and_indented_root():
    assert C.parse_simple_yaml("a:\n b:\n   c:\n      d: 1\ne: 2\n") == {"a": {"b": {"c": {"d": 1}}}, "e": 2}
    assert C.parse_simple_yaml("  a: 1\n  b:\n    c: 2\n") == {"a": 1, "b": {"c": 2}}


def test_line_numbers_are_kept():
    doc = C.parse_simple_yaml("---\n\ndefaults:\n  # c\n  concurrency: 8\nregistries:\n  h:5000:\n    insecure: on\n")
    assert doc.lines == {"defaults": 3, "registries": 6}
    assert doc["defaults"].lines == {"concurrency": 5}
    assert doc["registries"]["h:5000"].lines == {"insecure": 8}


# =============================================================================
# parse_simple_yaml: rejected, with the right line
# =============================================================================

@pytest.mark.parametrize("text, line, fragment", [
    ("a: 1\n\tb: 2\n", 2, "tab"),
    ("a:\n  b: 1\n \tc: 2\n", 3, "tab"),
    ("a:\n- x\n", 2, "lists"),
    ("- x\n", 1, "lists"),
    ("a:\n  -\n", 2, "lists"),
    ("a: - x\n", 1, "lists"),
    ("a: [1, 2]\n", 1, "flow"),
    ("a: {b: 1}\n", 1, "flow"),
    ("[::1]:5000: 1\n", 1, "quote keys"),
    ("{a: 1}\n", 1, "flow"),
    ("a: &x 1\n", 1, "anchors"),
    ("b: *x\n", 1, "aliases"),
    ("&x a: 1\n", 1, "anchors"),
    ("a: !!str 1\n", 1, "tags"),
    ("a: |\n  text\n", 1, "multi-line"),
    ("a: >-\n  text\n", 1, "multi-line"),
    ("x: 1\na: 1\nb: 2\na: 3\n", 4, "duplicate key 'a' (first on line 2)"),
    ("a:\n  b: 1\n  b: 2\n", 3, "duplicate key 'b'"),
    ("a: 1\n  b: 2\n", 2, "unexpected indentation"),
    ("a:\n  b: 1\n    c: 2\n", 3, "unexpected indentation"),
    ("a:\n    b: 1\n  c: 2\n", 3, "does not match"),
    ("  a: 1\nb: 2\n", 2, "does not match"),
    ("a: 'open\n", 1, "unterminated single"),
    ("a: \"open\n  more\"\n", 1, "unterminated double"),
    ("a: \"bad \\q\"\n", 1, "unsupported escape"),
    ("a: \"x\" y\n", 1, "unexpected text after the quoted value"),
    ("a: 'x'# c\n", 1, "unexpected text after the quoted value"),
    ("\"k\" : 1\n'k'x: 2\n", 2, "after the quoted key"),
    ("a: 1\njust text\n", 2, "expected 'key: value'"),
    ("a:b\n", 1, "expected 'key: value'"),
    ("text # with: colon in comment\n", 1, "expected 'key: value'"),
    ("a: b: c\n", 1, "cannot contain ': '"),
    ("a: b:\n", 1, "cannot contain ': '"),
    (": v\n", 1, "key is missing"),
    ("? k\n", 1, "complex keys"),
    ("%YAML 1.2\n---\na: 1\n", 1, "directives"),
    ("a: 1\n---\nb: 2\n", 2, "second document"),
    ("---\n---\n", 2, "second document"),
    ("--- a: 1\n", 1, "document markers"),
    ("a: 1\n...\n", 2, "document markers"),
    ("a: @x\n", 1, "reserved"),
    ("a: `x`\n", 1, "reserved"),
])
def test_rejected(text, line, fragment):
    message = usage_error(C.parse_simple_yaml, text)
    assert message.startswith("config.yaml line %d: " % line), message
    assert fragment in message


def test_source_names_the_file():
    message = usage_error(C.parse_simple_yaml, "a: [1]\n", "/etc/x/config.yaml")
    assert message.startswith("/etc/x/config.yaml line 1: ")


# =============================================================================
# Config
# =============================================================================

FULL = """\
defaults:
  concurrency: 8
  retries: 0
  no_progress: yes
  platform: linux/arm64/v8
  cache: false
registries:
  mirror.internal:5000:
    plain_http: true
  Registry.Example.COM:
    ca_file: certs/ca.pem
    insecure: false
    auth_type: bearer
  docker.io:
    mirror: Mirror.Internal:5000
  "[::1]:5001":
    auth_type: none
  plain.example:
"""


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return str(path)


def test_config_full(tmp_path):
    path = write(tmp_path, FULL)
    config = C.Config.load(path)
    assert config.path == path
    assert config.default("concurrency", 4) == 8
    assert config.default("retries", 3) == 0          # a falsy value still wins over the fallback
    assert config.default("no_progress", False) is True
    assert config.default("platform") == "linux/arm64/v8"
    assert config.default("cache", True) is False
    assert config.default("timeout", 30.0) == 30.0    # not settable: the fallback
    assert config.registry("mirror.internal:5000") == {"plain_http": True}
    assert config.registry("MIRROR.internal:5000") == {"plain_http": True}
    assert config.registry("mirror.internal") == {}   # host:port is matched exactly
    assert config.registry("registry.example.com") == {
        "ca_file": str(tmp_path / "certs" / "ca.pem"), "insecure": False, "auth_type": "bearer"}
    assert config.registry("docker.io") == {"mirror": "mirror.internal:5000"}
    assert config.registry(starget.DOCKER_HUB) == {"mirror": "mirror.internal:5000"}
    assert config.registry("[::1]:5001") == {"auth_type": "none"}
    assert config.registry("plain.example") == {}
    assert config.registry("unknown.example") == {}
    assert config.flag_defaults() == {"concurrency": 8, "retries": 0, "no_progress": True,
                                      "platform": "linux/arm64/v8", "no_cache": True}


def test_config_registry_returns_a_copy():
    config = C.Config.from_text("registries:\n  h:\n    insecure: true\n")
    config.registry("h")["insecure"] = False
    assert config.registry("h") == {"insecure": True}


def test_config_endpoint_follows_the_mirror():
    config = C.Config.from_text(FULL)
    assert config.endpoint(starget.DOCKER_HUB) == ("mirror.internal:5000", {"plain_http": True})
    assert config.endpoint("quay.io") == ("quay.io", {})
    assert config.endpoint("mirror.internal:5000") == ("mirror.internal:5000", {"plain_http": True})


def test_config_ca_file_home_and_absolute(tmp_path):
    config = C.Config.from_text("registries:\n  a:\n    ca_file: ~/ca.pem\n  b:\n    ca_file: /abs/ca.pem\n",
                                source=str(tmp_path / "config.yaml"))
    assert config.registry("a")["ca_file"] == os.path.expanduser("~/ca.pem")
    assert config.registry("b")["ca_file"] == "/abs/ca.pem"


def test_config_null_sections_and_values():
    config = C.Config.from_text("defaults:\nregistries:\n")
    assert config.flag_defaults() == {}
    config = C.Config.from_text("defaults:\n  concurrency: ~\n  platform:\n")
    assert config.default("concurrency", 4) == 4
    assert config.flag_defaults() == {}


def test_missing_default_file_is_empty(tmp_path):
    config = C.Config.load(environ={"HOME": str(tmp_path)})
    assert config.path is None and config.flag_defaults() == {} and config.registry("x") == {}
    (tmp_path / ".stargz-get").write_text("not a directory")      # ~/.stargz-get is a file: still no config
    assert C.Config.load(environ={"HOME": str(tmp_path)}).path is None


def test_default_file_under_home(tmp_path):
    os.mkdir(str(tmp_path / ".stargz-get"))
    path = write(tmp_path / ".stargz-get", SEED)
    config = C.Config.load(environ={"HOME": str(tmp_path)})
    assert config.path == path and config.default("concurrency") == 8


def test_starget_config_env(tmp_path):
    path = write(tmp_path, SEED, "other.yaml")
    config = C.Config.load(environ={"HOME": str(tmp_path), "STARGET_CONFIG": path})
    assert config.path == path and config.default("concurrency") == 8
    message = usage_error(C.Config.load, None, {"HOME": str(tmp_path), "STARGET_CONFIG": path + ".missing"})
    assert "does not exist" in message and "STARGET_CONFIG" in message
    # an empty STARGET_CONFIG is unset
    assert C.Config.load(environ={"HOME": str(tmp_path), "STARGET_CONFIG": ""}).path is None


def test_explicit_path_must_exist(tmp_path):
    assert "does not exist" in usage_error(C.Config.load, str(tmp_path / "nope.yaml"), {})


def test_unreadable_files(tmp_path):
    assert "cannot read" in usage_error(C.Config.load, str(tmp_path), {})       # a directory
    assert "not UTF-8" in usage_error(C.Config.load, write(tmp_path, b"a: \xff\n"), {})
    big = write(tmp_path, b"# " + b"x" * (C.MAX_CONFIG_SIZE + 1))
    assert "larger than" in usage_error(C.Config.load, big, {})


def test_syntax_errors_name_the_file(tmp_path):
    path = write(tmp_path, "defaults:\n  concurrency: [8]\n")
    assert usage_error(C.Config.load, path, {}).startswith(path + " line 2: flow")


@pytest.mark.parametrize("text, line, fragment", [
    ("default:\n  concurrency: 8\n", 1, "unknown key 'default' (known: defaults, registries)"),
    ("defaults:\n  concurency: 8\n", 2, "unknown key 'concurency' in defaults (known: cache, concurrency,"),
    ("registries:\n  h:\n    plain-http: true\n", 3, "unknown key 'plain-http' in registries.h"),
    ("defaults: 8\n", 1, "defaults must be a mapping"),
    ("registries: none\n", 1, "registries must be a mapping"),
    ("registries:\n  h: true\n", 2, "registries.h must be a mapping"),
    ("defaults:\n  concurrency: 0\n", 2, "defaults.concurrency must be a whole number from 1 to 256, got 0"),
    ("defaults:\n  concurrency: 257\n", 2, "from 1 to 256"),
    ("defaults:\n  concurrency: many\n", 2, "got 'many'"),
    ("defaults:\n  concurrency: true\n", 2, "got True"),
    ("defaults:\n  concurrency: '8'\n", 2, "got '8'"),
    ("defaults:\n  retries: 21\n", 2, "defaults.retries must be a whole number from 0 to 20"),
    ("defaults:\n  retries: -1\n", 2, "from 0 to 20"),
    ("defaults:\n  no_progress: 1\n", 2, "defaults.no_progress must be true or false, got 1"),
    ("defaults:\n  cache: 'true'\n", 2, "defaults.cache must be true or false"),
    ("defaults:\n  platform: linux\n", 2, "defaults.platform: invalid platform"),
    ("defaults:\n  platform: 64\n", 2, "defaults.platform must be a string"),
    ("registries:\n  https://h:\n    insecure: true\n", 2, "not a registry host[:port]"),
    ("registries:\n  h/path:\n", 2, "not a registry host[:port]"),
    ("registries:\n  h:\n    insecure: maybe\n", 3, "registries.h.insecure must be true or false"),
    ("registries:\n  h:\n    ca_file: ''\n", 3, "registries.h.ca_file must be a string"),
    ("registries:\n  h:\n    mirror: http://m\n", 3, "registries.h.mirror must be a registry host[:port]"),
    ("registries:\n  h:\n    auth_type: digest\n", 3, "auth_type must be one of basic, bearer, none, got 'digest'"),
    ("registries:\n  docker.io:\n\n  registry-1.docker.io:\n", 4, "same registry as line 2"),
    ("registries:\n  H:\n  h:\n", 3, "same registry as line 2"),
])
def test_config_validation(text, line, fragment):
    message = usage_error(C.Config.from_text, text)
    assert message.startswith("config.yaml line %d: " % line), message
    assert fragment in message, message


def test_flags_win_over_the_file():
    """The wiring the lead adds to main(): config values fill only the flags not given."""
    config = C.Config.from_text("defaults:\n  concurrency: 8\n  retries: 5\n  cache: false\n")
    args = starget.build_parser().parse_args(["--concurrency", "2", "ls", "img"])
    given = set(vars(args))
    for key, value in starget._GLOBAL_DEFAULTS.items():
        if key not in given:
            setattr(args, key, value)
    for key, value in config.flag_defaults().items():
        if key not in given:
            setattr(args, key, value)
    assert (args.concurrency, args.retries, args.no_cache, args.timeout) == (2, 5, True, 30.0)


# =============================================================================
# complete_paths and __complete
# =============================================================================

def _entry(path, kind="reg", link=None):
    return starget.TOCEntry(path, kind, link=link, size=0, mode=0o644)


class FakeIndex(object):
    def __init__(self, entries, layer=None):
        self._view = {e.path: e for e in entries}
        self._layer = {e.path: e for e in (layer or [])}
        self.blobs = []

    def view(self, blob=None):
        self.blobs.append(blob)
        return self._layer if blob else self._view


INDEX = FakeIndex([
    _entry("", "dir"), _entry("etc", "dir"), _entry("etc/hosts"), _entry("etc/hostname"),
    _entry("etc/ssl", "dir"), _entry("etc/ssl/certs", "dir"), _entry("etc/ssl/certs/ca.pem"),
    _entry("etc.d"), _entry("usr", "dir"), _entry("usr/lib", "dir"), _entry("usr/lib/libc.so"),
    _entry("usr/lib/libm.so"), _entry("lib", "symlink", link="usr/lib"),
    _entry("abslib", "symlink", link="/usr/lib/"), _entry("hostlink", "symlink", link="etc/hosts"),
    _entry("loop", "symlink", link="loop"), _entry("dangling", "symlink", link="nowhere"),
    _entry("bin", "hardlink", link="usr/lib/libc.so"), _entry(".hidden"),
])


@pytest.mark.parametrize("prefix, expected", [
    ("", [".hidden", "abslib/", "bin", "dangling", "etc.d", "etc/", "hostlink", "lib/", "loop", "usr/"]),
    ("e", ["etc.d", "etc/"]),
    ("etc", ["etc.d", "etc/"]),
    ("etc/", ["etc/hostname", "etc/hosts", "etc/ssl/"]),
    ("etc/host", ["etc/hostname", "etc/hosts"]),
    ("etc/hosts", ["etc/hosts"]),
    ("etc/ssl/c", ["etc/ssl/certs/"]),
    ("etc/x", []),
    ("/etc/h", ["/etc/hostname", "/etc/hosts"]),
    ("./etc/s", ["./etc/ssl/"]),
    ("/", ["/.hidden", "/abslib/", "/bin", "/dangling", "/etc.d", "/etc/", "/hostlink", "/lib/", "/loop", "/usr/"]),
    ("lib/", ["lib/libc.so", "lib/libm.so"]),          # through a link to a directory
    ("abslib/libm", ["abslib/libm.so"]),
    ("etc/hosts/", []),                                  # a file is no directory
    ("nope/", []),
    ("loop/", []),
    ("usr/../etc/ho", ["usr/../etc/hostname", "usr/../etc/hosts"]),
])
def test_complete_paths(prefix, expected):
    assert P.complete_paths(INDEX, prefix) == expected


def test_complete_paths_of_one_layer():
    index = FakeIndex([_entry("", "dir")], layer=[_entry("only", "dir"), _entry("only/f")])
    assert P.complete_paths(index, "o", "sha256:ab") == ["only/"]
    assert index.blobs == ["sha256:ab"]


def test_cmd_complete():
    index = INDEX
    asked = []

    class Session(object):
        args = argparse.Namespace(args=["sha256:ab", "etc/h"])

        def index(self, blob=None):
            asked.append(blob)
            return FakeIndex([], layer=list(index._view.values()))

    out = io.StringIO()
    assert P.cmd_complete(Session(), out) == 0
    assert out.getvalue() == "etc/hostname\netc/hosts\n" and asked == ["sha256:ab"]
    Session.args = argparse.Namespace(args=[""])
    out = io.StringIO()
    Session.index = lambda self, blob=None: INDEX
    P.cmd_complete(Session(), out)
    assert out.getvalue().split("\n")[:2] == [".hidden", "abslib/"]


# =============================================================================
# completion scripts
# =============================================================================

def test_unknown_shell():
    assert "unknown shell 'tcsh'" in usage_error(P.completion_script, "tcsh")


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_scripts_mention_everything(shell):
    script = P.completion_script(shell)
    assert "@" + "PLATFORMS@" not in script and "starget" in script and "__complete" in script
    for word in ("info", "ls", "get", "cat", "completion", "linux/amd64", "linux/arm/v7", "linux/riscv64"):
        assert word in script, word
    for flag in ("credential", "verbose", "debug", "insecure", "no-progress", "concurrency", "platform",
                 "retries", "skip-verify", "no-cache", "cacert", "timeout", "connect-timeout", "version",
                 "fallback-stream", "json", "long", "sizes"):
        assert flag in script, flag


def _option_strings(parser):
    return {o for a in parser._actions for o in a.option_strings}


def test_flags_match_the_parser():
    """Every flag starget accepts is completed (a new flag must be added to the tables)."""
    parser = starget.build_parser()
    completed = {f for f, _, _ in P._COMPLETION_GLOBAL_FLAGS}
    assert _option_strings(parser) - {"--version"} == completed
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        if name.startswith("_"):
            continue
        assert name in [c for c, _ in P._COMPLETION_COMMANDS]
        own = _option_strings(sub) - completed
        assert own == {f for f, _ in P._COMPLETION_COMMAND_FLAGS.get(name, ())}, name


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_script_syntax(shell, tmp_path):
    if not shutil.which(shell):
        pytest.skip("%s is not installed" % shell)
    path = tmp_path / ("completion." + shell)
    path.write_text(P.completion_script(shell))
    proc = subprocess.run([shell, "-n", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.returncode == 0, proc.stderr.decode()


FAKE_STARGET = r"""#!/bin/sh
# A stand-in starget: logs its arguments (<one> a line, then END) and
# answers __complete with the fixed candidates that start with the last argument.
{ for arg; do printf '<%s>\n' "$arg"; done; echo END; } >> "$STARGET_LOG"
for last; do :; done
case " $* " in
  *" __complete "*)
    for c in etc/ etc.d usr/ usr/a:bc 'with space'; do
      case "$c" in "$last"*) printf '%s\n' "$c" ;; esac
    done ;;
esac
"""

def read_calls(log):
    """The fake's calls: one list of arguments per run."""
    calls, current = [], []
    for line in log.read_text().split("\n") if log.exists() else []:
        if line == "END":
            calls.append(current)
            current = []
        elif line:
            current.append(line[1:-1])
    return calls


BASH_WORDBREAKS = " \t\n\"'><=;|&(:@"


@pytest.fixture
def fake_starget(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "starget").write_text(FAKE_STARGET)
    os.chmod(str(bindir / "starget"), 0o755)
    (tmp_path / "work" / "outdir").mkdir(parents=True)
    (tmp_path / "work" / "other").mkdir()
    (tmp_path / "work" / "file").write_text("")
    env = dict(os.environ, PATH="%s:%s" % (bindir, os.environ["PATH"]), STARGET_LOG=str(tmp_path / "log"))
    return types.SimpleNamespace(env=env, log=tmp_path / "log", cwd=str(tmp_path / "work"), tmp=tmp_path)


def bash_words(line, wordbreaks=BASH_WORDBREAKS):
    """COMP_WORDS as bash makes them: blanks separate words, and runs of the
    COMP_WORDBREAKS characters ':', '=', '@' are words of their own."""
    import re
    breaks = "".join(c for c in ":=@" if c in wordbreaks)
    words = []
    for token in line.split():
        pieces = re.split("([%s]+)" % breaks, token) if breaks else [token]
        words.extend(w for w in pieces if w)
    if line.endswith(" "):
        words.append("")
    return words


def quote(word):
    return "'" + word.replace("'", "'\\''") + "'"


def run_bash(fake, line, wordbreaks=BASH_WORDBREAKS):
    """Complete `line` (cursor at its end) with _starget; returns (COMPREPLY, calls)."""
    words = bash_words(line, wordbreaks)
    script = fake.tmp / "completion.bash"
    script.write_text(P.completion_script("bash"))
    program = ("source %s\nCOMP_WORDBREAKS=%s\nCOMP_WORDS=(%s)\nCOMP_CWORD=%d\nCOMP_LINE=%s\nCOMP_POINT=%d\n"
               "_starget\nprintf '%%s\\n' \"${COMPREPLY[@]}\"\n"
               % (quote(str(script)), quote(wordbreaks), " ".join(quote(w) for w in words), len(words) - 1,
                  quote(line), len(line)))
    if fake.log.exists():
        fake.log.unlink()
    proc = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], env=fake.env, cwd=fake.cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr.decode()
    replies = [r for r in proc.stdout.decode().split("\n") if r]
    calls = read_calls(fake.log)
    return replies, calls


needs_bash = pytest.mark.skipif(not shutil.which("bash"), reason="bash is not installed")


@needs_bash
@pytest.mark.parametrize("line, expected", [
    ("starget ", ["info", "ls", "get", "cat", "completion"]),
    ("starget g", ["get"]),
    ("starget c", ["cat", "completion"]),
    ("starget -k --platform linux/amd64 i", ["info"]),
    ("starget --pl", ["--platform"]),
    ("starget --vers", ["--version"]),
    ("starget get --vers", []),                     # --version only before the command
    ("starget ls img -", None),                       # checked below
    ("starget --platform ", ["linux/amd64", "linux/arm64", "linux/arm64/v8", "linux/arm/v7", "linux/ppc64le",
                             "linux/s390x", "linux/riscv64"]),
    ("starget ls --platform linux/arm", ["linux/arm64", "linux/arm64/v8", "linux/arm/v7"]),
    ("starget --platform=linux/arm6", ["linux/arm64", "linux/arm64/v8"]),   # only the part after '='
    ("starget --concurrency ", []),
    ("starget --credential u:", []),
    ("starget completion ", ["bash", "zsh", "fish"]),
    ("starget completion z", ["zsh"]),
    ("starget completion bash ", []),
    ("starget info ", []),
    ("starget get ", []),                             # IMAGE: nothing to offer
    ("starget get img etc/ ou", ["outdir"]),           # OUTPUT_DIR: local directories
    ("starget get img sha256:ab etc/ ", ["outdir", "other"]),
    ("starget cat img etc/ ", []),                    # cat takes one PATH
    ("starget get img sha256:ab", []),                # a layer digest, not a path
])
def test_bash_completion(fake_starget, line, expected):
    replies, calls = run_bash(fake_starget, line)
    if expected is None:
        assert {"--json", "-l", "--long", "--sizes", "--platform"} <= set(replies)
        return
    assert sorted(replies) == sorted(expected)
    assert calls == []


@needs_bash
@pytest.mark.parametrize("line, expected, call", [
    ("starget get 127.0.0.1:5000/test/img:latest e", ["etc/", "etc.d"],
     ["__complete", "127.0.0.1:5000/test/img:latest", "e"]),
    ("starget cat img ", ["etc/", "etc.d", "usr/", "usr/a:bc", "with space"], ["__complete", "img", ""]),

    ("starget -k --platform=linux/arm64 -v --credential u:p get --no-cache [::1]:5000/a/b@sha256:0123 et",
     ["etc/", "etc.d"],
     ["-k", "--platform=linux/arm64", "--credential", "u:p", "--no-cache", "__complete",
      "[::1]:5000/a/b@sha256:0123", "et"]),
    ("starget get --json img --retries 2 sha256:abcd us", ["usr/", "usr/a:bc"],
     ["--retries", "2", "__complete", "img", "sha256:abcd", "us"]),
    ("starget get img usr/a:", ["bc"], ["__complete", "img", "usr/a:"]),   # only the part after ':'
])
def test_bash_path_completion(fake_starget, line, expected, call):
    replies, calls = run_bash(fake_starget, line)
    assert sorted(replies) == sorted(expected)
    assert calls == [call]


@needs_bash
def test_bash_ls_takes_no_image_path(fake_starget):
    # `ls IMAGE [BLOB]` has no PATH: nothing asks the image for paths there.
    replies, calls = run_bash(fake_starget, "starget ls img u")
    assert calls == [] and not any(r.startswith("usr") for r in replies)


@needs_bash
def test_bash_without_colon_in_wordbreaks(fake_starget):
    # Some setups take ':' (or '=') out of COMP_WORDBREAKS; then bash does not split there
    # and readline replaces the whole word: candidates keep their beginning.
    replies, calls = run_bash(fake_starget, "starget get img usr/a:", wordbreaks=" \t\n\"'><=;|&(")
    assert calls == [["__complete", "img", "usr/a:"]]
    assert replies == ["usr/a:bc"]
    replies, calls = run_bash(fake_starget, "starget --platform=linux/arm6", wordbreaks=" \t\n\"'><;|&(")
    assert replies == ["--platform=linux/arm64", "--platform=linux/arm64/v8"]


ZSH_STUBS = r"""
compadd() { print -r -- "compadd $*"; }
_describe() { print -r -- "describe ${(@P)4}"; }
_files() { print -r -- "files $*"; }
compset() { :; }
compdef() { print -r -- "compdef $*"; }
"""


def run_zsh(fake, words):
    script = fake.tmp / "_starget"
    script.write_text(P.completion_script("zsh"))
    program = ZSH_STUBS + "source %s\nwords=(%s)\nCURRENT=%d\n_starget\n" % (
        quote(str(script)), " ".join(quote(w) for w in words), len(words))
    if fake.log.exists():
        fake.log.unlink()
    proc = subprocess.run(["zsh", "-f", "-c", program], env=fake.env, cwd=fake.cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr.decode()
    calls = read_calls(fake.log)
    return proc.stdout.decode().split("\n"), calls


@pytest.mark.skipif(not shutil.which("zsh"), reason="zsh is not installed")
def test_zsh_completion(fake_starget):
    out, _ = run_zsh(fake_starget, ["starget", ""])
    assert out[0] == "compdef _starget starget"
    assert out[1].startswith("describe info:show the layers of the image ls:")
    out, _ = run_zsh(fake_starget, ["starget", "--platform", ""])
    assert out[1] == "compadd -- linux/amd64 linux/arm64 linux/arm64/v8 linux/arm/v7 linux/ppc64le " \
                     "linux/s390x linux/riscv64"
    out, _ = run_zsh(fake_starget, ["starget", "ls", "img", "--"])
    assert "--sizes" in out[1] and "--json" in out[1] and "--version" not in out[1]
    out, calls = run_zsh(fake_starget, ["starget", "-k", "--platform", "linux/arm64", "get", "h:5000/i:t", "e"])
    assert calls == [["-k", "--platform", "linux/arm64", "__complete", "h:5000/i:t", "e"]]
    assert out[1:3] == ["compadd -S  -- etc/", "compadd -- etc.d"]
    out, calls = run_zsh(fake_starget, ["starget", "cat", "img", "sha256:ab", ""])
    assert calls == [["__complete", "img", "sha256:ab", ""]]
    out, calls = run_zsh(fake_starget, ["starget", "get", "img", "etc/", ""])
    assert out[1] == "files -/" and calls == []
    out, _ = run_zsh(fake_starget, ["starget", "completion", ""])
    assert out[1] == "compadd -- bash zsh fish"


def run_fish(fake, line):
    script = fake.tmp / "starget.fish"
    script.write_text(P.completion_script("fish"))
    if fake.log.exists():
        fake.log.unlink()
    proc = subprocess.run(["fish", "--no-config", "-c", "source %s; complete -C%s" % (quote(str(script)), quote(line))],
                          env=fake.env, cwd=fake.cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr.decode()
    calls = read_calls(fake.log)
    return [r.split("\t")[0] for r in proc.stdout.decode().split("\n") if r], calls


@pytest.mark.skipif(not shutil.which("fish"), reason="fish is not installed")
def test_fish_completion(fake_starget):
    replies, _ = run_fish(fake_starget, "starget ")
    assert sorted(replies) == ["cat", "completion", "get", "info", "ls"]
    replies, _ = run_fish(fake_starget, "starget --platform linux/arm")
    assert sorted(replies) == ["linux/arm/v7", "linux/arm64", "linux/arm64/v8"]
    replies, _ = run_fish(fake_starget, "starget ls img --")
    assert {"--json", "--long", "--sizes", "--platform"} <= set(replies) and "--version" not in replies
    replies, calls = run_fish(fake_starget, "starget -k --platform linux/arm64 -v get 127.0.0.1:5000/i:t e")
    assert sorted(replies) == ["etc.d", "etc/"]
    assert calls == [["-k", "--platform", "linux/arm64", "__complete", "127.0.0.1:5000/i:t", "e"]]
    replies, calls = run_fish(fake_starget, "starget cat img sha256:ab ")
    assert calls == [["__complete", "img", "sha256:ab", ""]]
    replies, calls = run_fish(fake_starget, "starget get img etc/ ou")
    assert replies == ["outdir/"] and calls == []
    replies, calls = run_fish(fake_starget, "starget completion ")
    assert sorted(replies) == ["bash", "fish", "zsh"]


def test_bash_readline_end_to_end(fake_starget):
    """A real interactive bash on a pty: readline's own word splitting and insertion."""
    pty = pytest.importorskip("pty")
    import select
    import time
    if not shutil.which("bash"):
        pytest.skip("bash is not installed")
    script = fake_starget.tmp / "completion.bash"
    script.write_text(P.completion_script("bash"))
    env = dict(fake_starget.env, INPUTRC="/dev/null", PS1="$ ", TERM="dumb")

    def complete(line):
        pid, fd = pty.fork()
        if pid == 0:  # pragma: no cover - the child
            os.chdir(fake_starget.cwd)
            os.execvpe("bash", ["bash", "--norc", "--noprofile", "-i"], env)
        out = [b""]

        def read_until(marker):
            deadline = time.time() + 10
            while marker not in out[0] and time.time() < deadline:
                if select.select([fd], [], [], 0.1)[0]:
                    try:
                        out[0] += os.read(fd, 4096)
                    except OSError:
                        break

        try:
            os.write(fd, b"source %s; echo RE''ADY\n" % str(script).encode())
            read_until(b"READY\r\n$ ")       # readline is waiting: type as a user would
            os.write(fd, line.encode() + b"\t")
            time.sleep(0.3)
            os.write(fd, b"\x05 #DONE\n")     # end of line, then a mark
            read_until(b"#DONE\r\n")
        finally:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            os.close(fd)
        text = out[0].decode("utf-8", "replace")
        return text[text.index("READY\r\n"):].replace("\x07", "")

    assert "starget get 127.0.0.1:5000/img:latest usr/ #DONE" in \
        complete("starget get 127.0.0.1:5000/img:latest us")
    assert "starget get img@sha256:0123 etc.d  #DONE" in complete("starget get img@sha256:0123 etc.")
    assert "starget --platform=linux/riscv64  #DONE" in complete("starget --platform=linux/r")
    assert "starget get img usr/a:bc  #DONE" in complete("starget get img usr/a:")
    assert "starget cat img with\\ space  #DONE" in complete("starget cat img wi")
