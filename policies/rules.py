"""Rule files: operator-tunable header, body, raw, URI and meta rules (TOML).

Each rule has a name (its symbol), a score and a description; patterns are
RE2 regular expressions (google-re2: linear time, so no message can make a
rule run for seconds; back-references and look-around are rejected with a
clear error). Shipped rule files live in ``policies/rules/``; operators add
theirs with ``[policies.rules] files = [...]`` (relative to the config
directory). Files load when the policy starts, so a SIGHUP reload (a new
Engine) re-reads them; a broken file stops start-up with an error naming the
file, the rule and the problem.

    [[rule]]
    name = "SUBJ_FREE_MONEY"
    type = "header"            # header | body | raw | uri | meta
    header = "Subject"         # header rules: field name, or "ALL" for every field
    pattern = '(?i)free money'
    score = 2.0
    description = "Subject offers free money"

See docs/policies/spam.md for every key.
"""

from __future__ import annotations

import enum
import operator
import re
import tomllib
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import re2

from gateway.api import (
    Action,
    Context,
    OptionError,
    Policy,
    Result,
    Services,
    Symbol,
    SymbolDef,
    body_text,
    urls,
)
from policies._mail import all_headers, header

__all__ = ["Rule", "RuleError", "RuleSet", "RuleType", "RulesOptions", "RulesPolicy", "load_rules"]

_NAME = re.compile(r"^(?:__)?[A-Z][A-Z0-9_]{0,63}$")
_ACTIONS = {a.value: a for a in (Action.ADD_HEADER, Action.QUARANTINE, Action.REJECT)}
_DETAIL_MAX = 60


class RuleType(enum.Enum):
    HEADER = "header"
    BODY = "body"
    RAW = "raw"
    URI = "uri"
    META = "meta"


class RuleError(ValueError):
    """A rule file problem: which file, which rule, what is wrong."""

    def __init__(self, file: str, rule: str, problem: str) -> None:
        where = f"{file}: rule {rule}" if rule else file
        super().__init__(f"{where}: {problem}")
        self.file = file
        self.rule = rule
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    type: RuleType
    score: float
    description: str
    file: str
    pattern: str = ""
    header: str = ""  # header rules
    exists: bool | None = None  # header rules: presence test instead of a pattern
    negate: bool = False  # fires when the pattern does NOT match
    expression: str = ""  # meta rules
    action: Action | None = None  # forced floor when the rule fires

    @property
    def reported(self) -> bool:
        """``__NAME`` rules are building blocks for meta rules, never symbols."""
        return not self.name.startswith("__")


# -- meta expressions ---------------------------------------------------------

_TOKEN = re.compile(r"\s*(?:(&&|\|\||>=|<=|==|!=|[!()+<>])|([A-Za-z_][A-Za-z0-9_]*)|([0-9]{1,4}))")
_COMPARE: dict[str, Callable[[int, int], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}

Expr = Callable[[Container[str]], int]  # the names of the rules that fired -> a count


def _parse_expression(text: str) -> tuple[Expr, frozenset[str]]:
    """``A && (B || !C)`` or ``(A + B + C) >= 2`` -> an evaluator and the names it reads.

    As in SpamAssassin's meta rules, a rule name counts 1 when it fired and 0
    when not, ``+`` adds, a comparison with a whole number is 1 or 0, and the
    rule fires when the expression is not 0: "at least two of these phrases"
    is ``(__A + __B + __C) >= 2``, without writing out every pair. No eval().
    """
    tokens: list[str] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"unexpected {text[pos:].strip()[:20]!r} at position {pos}")
        tokens.append(m.group(1) or m.group(2) or m.group(3))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    if len(tokens) > 200:
        raise ValueError("expression is too long (over 200 tokens)")
    names: set[str] = set()
    i = 0

    def peek() -> str | None:
        return tokens[i] if i < len(tokens) else None

    def take() -> str:
        nonlocal i
        if i >= len(tokens):
            raise ValueError("expression ends too early")
        i += 1
        return tokens[i - 1]

    def p_or(depth: int) -> Expr:
        left = p_and(depth)
        while peek() == "||":
            take()
            right = p_and(depth)
            left = (lambda a, b: lambda v: int(bool(a(v) or b(v))))(left, right)
        return left

    def p_and(depth: int) -> Expr:
        left = p_compare(depth)
        while peek() == "&&":
            take()
            right = p_compare(depth)
            left = (lambda a, b: lambda v: int(bool(a(v) and b(v))))(left, right)
        return left

    def p_compare(depth: int) -> Expr:
        left = p_sum(depth)
        op = peek()
        if op in _COMPARE:
            take()
            number = take()
            if not number.isdigit():
                raise ValueError(f"{op} must be followed by a whole number, got {number!r}")
            test, bound = _COMPARE[op], int(number)
            return lambda v: int(test(left(v), bound))
        return left

    def p_sum(depth: int) -> Expr:
        terms = [p_not(depth)]
        while peek() == "+":
            take()
            terms.append(p_not(depth))
        if len(terms) == 1:
            return terms[0]
        return lambda v: sum(t(v) for t in terms)

    def p_not(depth: int) -> Expr:
        if depth > 32:
            raise ValueError("expression nests too deeply")
        tok = take()
        if tok == "!":
            inner = p_not(depth + 1)
            return lambda v: int(not inner(v))
        if tok == "(":
            inner = p_or(depth + 1)
            if take() != ")":
                raise ValueError("missing ')'")
            return inner
        if tok.isdigit():
            raise ValueError(f"a number ({tok}) may only follow a comparison such as >=")
        if not (tok[0].isalpha() or tok[0] == "_"):
            raise ValueError(f"unexpected {tok!r}")
        names.add(tok)
        return lambda v: int(tok in v)

    if not tokens:
        raise ValueError("expression is empty")
    expr = p_or(0)
    if i != len(tokens):
        raise ValueError(f"unexpected {tokens[i]!r} after a complete expression")
    return expr, frozenset(names)


# -- loading ------------------------------------------------------------------

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False
_RE2_OPTIONS.max_mem = 8 << 20  # bytes of DFA/NFA memory per pattern


def _compile(pattern: str) -> Any:
    return re2.compile(pattern, options=_RE2_OPTIONS)


_KEYS = {
    "name",
    "type",
    "score",
    "description",
    "pattern",
    "header",
    "exists",
    "negate",
    "expression",
    "action",
}


def _rule_from_table(
    table: Any, file: str, index: int
) -> tuple[Rule, Any, Expr | None, frozenset[str]]:
    if not isinstance(table, dict):
        raise RuleError(file, f"#{index + 1}", "must be a table ([[rule]])")
    name = table.get("name")
    label = name if isinstance(name, str) and name else f"#{index + 1}"
    if not isinstance(name, str) or not _NAME.match(name):
        raise RuleError(
            file, label, "name must be UPPER_SNAKE (A-Z, 0-9, _; __ prefix for sub-rules)"
        )

    def fail(problem: str) -> RuleError:
        return RuleError(file, name, problem)

    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise fail(f"unknown key {unknown[0]!r}; known keys: {', '.join(sorted(_KEYS))}")
    try:
        rtype = RuleType(table.get("type", ""))
    except ValueError:
        raise fail(
            f"type must be one of {', '.join(t.value for t in RuleType)}, got {table.get('type')!r}"
        ) from None
    score = table.get("score", 0.0 if name.startswith("__") else None)
    if isinstance(score, bool) or not isinstance(score, int | float):
        raise fail("score must be a number")
    description = table.get("description", "")
    if not isinstance(description, str) or (not description and not name.startswith("__")):
        raise fail("description must be a non-empty string saying what the rule means")
    action = None
    if "action" in table:
        action = _ACTIONS.get(table["action"])
        if action is None:
            raise fail(f"action must be one of {', '.join(_ACTIONS)}, got {table['action']!r}")
    negate = table.get("negate", False)
    if not isinstance(negate, bool):
        raise fail("negate must be true or false")
    compiled: Any = None
    expr: Expr | None = None
    reads: frozenset[str] = frozenset()
    pattern = table.get("pattern", "")
    hdr = table.get("header", "")
    exists = table.get("exists")
    expression = table.get("expression", "")
    if rtype is RuleType.META:
        if not isinstance(expression, str) or not expression:
            raise fail('meta rules need expression = "A && (B || !C)"')
        if pattern or hdr:
            raise fail("meta rules take expression, not pattern or header")
        try:
            expr, reads = _parse_expression(expression)
        except ValueError as exc:
            raise fail(f"bad expression: {exc}") from None
    else:
        if expression:
            raise fail(f"expression is only for meta rules, this is a {rtype.value} rule")
        if rtype is RuleType.HEADER:
            if not isinstance(hdr, str) or not hdr or not re.fullmatch(r"[!-9;-~]+", hdr):
                raise fail('header rules need header = "Field-Name" (or "ALL")')
            if exists is not None and not isinstance(exists, bool):
                raise fail("exists must be true or false")
            if exists is not None and pattern:
                raise fail("give either exists or pattern, not both")
        elif hdr or exists is not None:
            raise fail("header and exists are only for header rules")
        if exists is None:
            if not isinstance(pattern, str) or not pattern:
                raise fail("pattern must be a non-empty RE2 regular expression")
            try:
                compiled = _compile(pattern)
            except re2.error as exc:
                msg = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
                raise fail(
                    f"pattern {pattern!r} is not a valid RE2 expression ({msg}); "
                    "back-references and look-around are not supported"
                ) from None
    rule = Rule(
        name=name,
        type=rtype,
        score=float(score),
        description=description,
        file=file,
        pattern=pattern if isinstance(pattern, str) else "",
        header=hdr if isinstance(hdr, str) else "",
        exists=exists,
        negate=negate,
        expression=expression if isinstance(expression, str) else "",
        action=action,
    )
    return rule, compiled, expr, reads


def _read(path: Path, label: str) -> list[Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RuleError(label, "", "no such file; fix policies.rules.files") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleError(label, "", f"cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RuleError(label, "", f"not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"rule"})
    if unknown:
        raise RuleError(label, "", f"unknown top-level key {unknown[0]!r}; rules are [[rule]]")
    rules = data.get("rule", [])
    if not isinstance(rules, list):
        raise RuleError(label, "", "rules must be an array of tables: [[rule]]")
    return rules


@dataclass(frozen=True, slots=True)
class _Compiled:
    rule: Rule
    regex: Any  # re2 pattern, None for exists/meta
    expr: Expr | None
    reads: frozenset[str] = frozenset()  # meta rules: the names the expression reads


class RuleSet:
    """Loaded, validated rules in evaluation order (meta rules after what they read)."""

    def __init__(self, compiled: list[_Compiled]) -> None:
        self.rules = tuple(c.rule for c in compiled)
        self.by_name = {r.name: r for r in self.rules}
        self._header = [c for c in compiled if c.rule.type is RuleType.HEADER]
        self._body = _Family([c for c in compiled if c.rule.type is RuleType.BODY])
        self._raw = _Family([c for c in compiled if c.rule.type is RuleType.RAW])
        self._uri = _Family([c for c in compiled if c.rule.type is RuleType.URI])
        self._meta = [c for c in compiled if c.rule.type is RuleType.META]
        # Counting metas ("(A + B + C) >= 2") explain themselves by the names that fired;
        # the others by their expression and the evidence of what it names that fired.
        self._counted = {
            c.rule.name: sorted(c.reads) for c in self._meta if "+" in c.rule.expression
        }
        self._named = {c.rule.name: _names_in_order(c) for c in self._meta}

    def symbols(self) -> dict[str, SymbolDef]:
        return {r.name: SymbolDef(r.score, r.description) for r in self.rules if r.reported}

    def match(self, ctx: Context, max_text: int) -> dict[str, str]:
        """Names of the rules that fire -> evidence."""
        hits: dict[str, str] = {}
        if self._header:
            fields = [(n, _encodable(v)) for n, v in all_headers(ctx)]
            for c in self._header:
                r = c.rule
                if r.header.upper() == "ALL":
                    values = ["\n".join(f"{n}: {v}" for n, v in fields)]
                else:
                    key = r.header.lower()
                    values = [v for n, v in fields if n == key]
                if c.regex is None:  # presence test
                    if bool(values) == r.exists:
                        hits[r.name] = f"{r.header} {'present' if values else 'absent'}"
                    continue
                found = _first(c.regex, values)
                if (found is not None) != r.negate:
                    hits[r.name] = f"{r.header}: {found}" if found is not None else r.header
        if self._body:
            subject = header(ctx, "subject") or ""
            text = (subject + "\n" + body_text(ctx))[:max_text]
            self._scan(self._body, [_encodable(text)], hits)
        if self._raw:
            raw = ctx.raw[:max_text].decode("utf-8", "replace")
            self._scan(self._raw, [raw], hits)
        if self._uri:
            self._scan(self._uri, [_encodable(u.url) for u in urls(ctx)], hits)
        for c in self._meta:
            assert c.expr is not None
            if c.expr(hits):  # its keys are the rules fired so far, metas included
                counted = self._counted.get(c.rule.name)
                if counted is None:
                    hits[c.rule.name] = _meta_detail(
                        c.rule.expression, self._named[c.rule.name], hits
                    )
                else:
                    fired = [n for n in counted if n in hits]
                    hits[c.rule.name] = f"{len(fired)} of {len(counted)}: {', '.join(fired)}"
        return hits

    @staticmethod
    def _scan(family: _Family, texts: list[str], hits: dict[str, str]) -> None:
        matched = family.matching(texts)
        for i, c in enumerate(family.rules):
            if i in matched:
                if not c.rule.negate:
                    hits[c.rule.name] = _first(c.regex, texts) or ""
            elif c.rule.negate:
                hits[c.rule.name] = "no match"


class _Family:
    """Rules matched against the same texts: one RE2 set pass finds which ones match,
    and only those are searched again for their evidence."""

    def __init__(self, rules: list[_Compiled]) -> None:
        self.rules = rules
        self._set: Any = None
        if rules:
            s = re2.Set.SearchSet(_RE2_OPTIONS)
            for c in rules:
                s.Add(c.rule.pattern)
            s.Compile()
            self._set = s

    def __bool__(self) -> bool:
        return bool(self.rules)

    def matching(self, texts: list[str]) -> set[int]:
        found: set[int] = set()
        for text in texts:
            found.update(self._set.Match(text) or ())
            if len(found) == len(self.rules):
                break
        return found


def _encodable(text: str) -> str:
    """RE2 matches UTF-8: lone surrogates (undecodable bytes kept by the parser) become U+FFFD."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


_META_DETAIL_MAX = 200


def _names_in_order(c: _Compiled) -> tuple[str, ...]:
    """The rule names a meta expression reads, in the order it names them."""
    named = (m.group(2) for m in _TOKEN.finditer(c.rule.expression))  # the parser's tokens
    return tuple(dict.fromkeys(n for n in named if n in c.reads))


def _meta_detail(expression: str, names: tuple[str, ...], hits: Mapping[str, str]) -> str:
    """``A && !B <- A: Subject: watch``: the expression, then what fired of it and why.

    The expression alone (``__MSGID_OE_SHAPE && !__MUA_MICROSOFT``) tells an
    operator which building blocks mattered, not which header value matched.
    """
    evidence = "; ".join(f"{n}: {hits[n]}" if hits[n] else n for n in names if n in hits)
    return _clip(f"{expression} <- {evidence}" if evidence else expression, _META_DETAIL_MAX)


def _first(regex: Any, texts: list[str]) -> str | None:
    for text in texts:
        m = regex.search(text)
        if m is not None:
            return _evidence(m.group(0))
    return None


def _evidence(text: str) -> str:
    return _clip(" ".join(text.split()), _DETAIL_MAX)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def builtin_files() -> list[Path]:
    """The shipped rule files, in name order."""
    folder = resources.files("policies") / "rules"
    return sorted(
        Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml") and p.is_file()
    )


def load_rules(files: list[tuple[Path, str]], disabled: frozenset[str] = frozenset()) -> RuleSet:
    """Load (path, label) files in order. A later file may redefine an earlier rule by name
    (operators override shipped rules that way); a name twice in one file is an error.
    """
    by_name: dict[str, _Compiled] = {}
    for path, label in files:
        seen: set[str] = set()
        for i, table in enumerate(_read(path, label)):
            rule, regex, expr, reads = _rule_from_table(table, label, i)
            if rule.name in seen:
                raise RuleError(label, rule.name, "defined twice in this file")
            seen.add(rule.name)
            by_name.pop(rule.name, None)
            by_name[rule.name] = _Compiled(rule, regex, expr, reads)
    for name in disabled:
        by_name.pop(name, None)
    return RuleSet(_order(by_name, disabled))


def _order(by_name: dict[str, _Compiled], disabled: frozenset[str]) -> list[_Compiled]:
    """Plain rules first, then meta rules so each comes after the metas it reads."""
    plain = [c for c in by_name.values() if c.rule.type is not RuleType.META]
    metas = {n: c for n, c in by_name.items() if c.rule.type is RuleType.META}
    reads = {n: c.reads for n, c in metas.items()}
    for n, names in reads.items():
        for ref in sorted(names):
            if ref not in by_name and ref not in disabled:
                raise RuleError(
                    metas[n].rule.file, n, f"expression names {ref}, which no rule file defines"
                )
    ordered: list[_Compiled] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(n: str, path: list[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            cycle = " -> ".join([*path[path.index(n) :], n])
            raise RuleError(metas[n].rule.file, n, f"meta rules form a cycle: {cycle}")
        state[n] = 1
        for ref in sorted(reads[n]):
            if ref in metas:
                visit(ref, [*path, n])
        state[n] = 2
        ordered.append(metas[n])

    for n in metas:
        visit(n, [])
    return plain + ordered


# -- the policy ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RulesOptions:
    files: tuple[str, ...] = ()  # operator rule files, relative to the config directory
    builtin: bool = True  # load the shipped rule files (policies/rules/*.toml) first
    disable: tuple[str, ...] = ()  # rule names to switch off
    max_text: int = 262_144  # characters of body text and raw message matched

    def __post_init__(self) -> None:
        if self.max_text < 1024:
            raise OptionError("max_text", f"must be at least 1024, got {self.max_text}")
        for i, name in enumerate(self.disable):
            if not _NAME.match(name):
                raise OptionError(f"disable[{i}]", f"must be a rule name, got {name!r}")


class RulesPolicy(Policy):
    name = "rules"
    symbols = {}  # every symbol comes from rule files: see rule_symbols()
    Options = RulesOptions

    def __init__(self, options: RulesOptions) -> None:
        super().__init__(options)
        self.options: RulesOptions = options
        self.ruleset = RuleSet([])
        # Shipped and absolute-path files are checked now, so a broken file shows up
        # as early as possible; relative paths need the config directory (start).
        if all(Path(f).expanduser().is_absolute() for f in options.files):
            self.ruleset = self._load(None)

    def _load(self, config_dir: Path | None) -> RuleSet:
        files: list[tuple[Path, str]] = []
        if self.options.builtin:
            files += [(p, f"policies/rules/{p.name}") for p in builtin_files()]
        for f in self.options.files:
            path = Path(f).expanduser()
            if not path.is_absolute():
                if config_dir is None:
                    continue
                path = config_dir / path
            files.append((path, str(path)))
        try:
            return load_rules(files, frozenset(self.options.disable))
        except RuleError as exc:
            raise OptionError("files", str(exc)) from None

    async def start(self, services: Services) -> None:
        self.ruleset = self._load(services.config_dir)

    def rule_symbols(self) -> Mapping[str, SymbolDef]:
        return self.ruleset.symbols()

    async def check(self, ctx: Context) -> Result:
        hits = self.ruleset.match(ctx, self.options.max_text)
        by_name = self.ruleset.by_name
        symbols = tuple(
            Symbol(name, detail=detail) for name, detail in hits.items() if by_name[name].reported
        )
        force: Action | None = None
        reason = ""
        for name in hits:
            r = by_name[name]
            if r.action is not None and r.action.at_least(force) is r.action and r.action != force:
                force, reason = r.action, r.description
        return Result(symbols=symbols, force=force, reason=reason)
