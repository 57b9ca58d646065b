//! The segment language: readable rules such as
//! `page_count("mba", 7d) >= 3 and enrollment_status == "inquiry" and consent.email`.
//!
//! A hand-written recursive-descent parser (the grammar is small and errors must point at the
//! column), a validation pass that checks functions, arity and argument types when a segment is
//! defined, and an evaluator over a profile that also says when the answer will change by itself
//! (a counted view sliding out of its window), so exits happen on time.

use chrono::{DateTime, Duration, Utc};
use serde_json::Value as Json;
use std::fmt;

/// A parse or validation error, at a 1-based column of the rule text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at column {column}: {message}")]
pub struct RuleError {
    pub column: usize,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(f64),
    Str(String),
    Dur(i64),
    Ident(String),
    Op(&'static str),
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    Dot,
    End,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Num(n) => write!(f, "number {n}"),
            Tok::Str(s) => write!(f, "string {s:?}"),
            Tok::Dur(d) => {
                let unit = [(86_400, "d"), (3600, "h"), (60, "m")].into_iter().find(|(u, _)| d % u == 0);
                match unit {
                    Some((u, name)) => write!(f, "duration `{}{name}`", d / u),
                    None => write!(f, "duration `{d}s`"),
                }
            }
            Tok::Ident(i) => write!(f, "`{i}`"),
            Tok::Op(o) => write!(f, "`{o}`"),
            Tok::LParen => f.write_str("`(`"),
            Tok::RParen => f.write_str("`)`"),
            Tok::LBracket => f.write_str("`[`"),
            Tok::RBracket => f.write_str("`]`"),
            Tok::Comma => f.write_str("`,`"),
            Tok::Dot => f.write_str("`.`"),
            Tok::End => f.write_str("the end of the rule"),
        }
    }
}

/// Tokens with their character column (1-based).
fn lex(src: &str) -> Result<Vec<(Tok, usize)>, RuleError> {
    let chars: Vec<char> = src.chars().collect();
    let err = |column: usize, message: String| RuleError { column, message };
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let col = i + 1;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            let text: String = chars[start..i].iter().collect();
            let n: f64 = text.parse().map_err(|_| err(col, format!("`{text}` is not a number")))?;
            let unit = chars.get(i).copied().filter(char::is_ascii_alphabetic);
            let after_unit = chars.get(i + 1).is_some_and(|c| c.is_alphanumeric() || *c == '_');
            if let (Some(u), false) = (unit, after_unit) {
                let secs = match u {
                    's' => 1.0,
                    'm' => 60.0,
                    'h' => 3600.0,
                    'd' => 86_400.0,
                    'w' => 604_800.0,
                    other => return Err(err(i + 1, format!("unknown duration unit `{other}` (s, m, h, d, w)"))),
                };
                i += 1;
                out.push((Tok::Dur((n * secs).round() as i64), col));
            } else if unit.is_some() {
                return Err(err(i + 1, "a number must be followed by an operator or a unit (s, m, h, d, w)".into()));
            } else {
                out.push((Tok::Num(n), col));
            }
            continue;
        }
        if c == '"' || c == '\'' {
            let quote = c;
            let mut s = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err(err(col, "unterminated string".into())),
                    Some('\\') => {
                        match chars.get(i + 1) {
                            Some(e) => s.push(*e),
                            None => return Err(err(col, "unterminated string".into())),
                        }
                        i += 2;
                    }
                    Some(q) if *q == quote => {
                        i += 1;
                        break;
                    }
                    Some(ch) => {
                        s.push(*ch);
                        i += 1;
                    }
                }
            }
            out.push((Tok::Str(s), col));
            continue;
        }
        if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push((Tok::Ident(chars[start..i].iter().collect()), col));
            continue;
        }
        let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
        let op2 = ["==", "!=", ">=", "<=", "&&", "||"].into_iter().find(|o| *o == two);
        if let Some(op) = op2 {
            out.push((Tok::Op(op), col));
            i += 2;
            continue;
        }
        let tok = match c {
            '>' => Tok::Op(">"),
            '<' => Tok::Op("<"),
            '=' => Tok::Op("=="),
            '!' => Tok::Op("!"),
            '-' => Tok::Op("-"),
            '(' => Tok::LParen,
            ')' => Tok::RParen,
            '[' => Tok::LBracket,
            ']' => Tok::RBracket,
            ',' => Tok::Comma,
            '.' => Tok::Dot,
            other => return Err(err(col, format!("unexpected character `{other}`"))),
        };
        out.push((tok, col));
        i += 1;
    }
    out.push((Tok::End, chars.len() + 1));
    Ok(out)
}

/// Comparison operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Ge,
    Le,
    Gt,
    Lt,
    In,
    Contains,
}

/// A parsed rule.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Or(Vec<Expr>),
    And(Vec<Expr>),
    Not(Box<Expr>),
    Cmp(CmpOp, Box<Expr>, Box<Expr>),
    Call { name: String, args: Vec<Expr>, column: usize },
    Path { parts: Vec<String>, column: usize },
    Lit(Val),
    List(Vec<Expr>),
}

/// A value during evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    /// Seconds.
    Dur(i64),
    List(Vec<Val>),
}

impl Val {
    pub fn truthy(&self) -> bool {
        match self {
            Val::Null => false,
            Val::Bool(b) => *b,
            Val::Num(n) => *n != 0.0,
            Val::Str(s) => !s.is_empty(),
            Val::Dur(d) => *d != 0,
            Val::List(l) => !l.is_empty(),
        }
    }

    pub fn from_json(v: &Json) -> Val {
        match v {
            Json::Null => Val::Null,
            Json::Bool(b) => Val::Bool(*b),
            Json::Number(n) => n.as_f64().map_or(Val::Null, Val::Num),
            Json::String(s) => Val::Str(s.clone()),
            Json::Array(a) => Val::List(a.iter().map(Val::from_json).collect()),
            Json::Object(_) => Val::Null,
        }
    }
}

/// How deeply a rule may nest parentheses, lists, calls and `not`s. Parsing, validation and
/// evaluation recurse once per level, so without a bound a rule of a few thousand `(` (well
/// within a request body) overflows the stack and aborts the whole process.
const MAX_NESTING: usize = 64;

struct Parser {
    toks: Vec<(Tok, usize)>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> &Tok {
        self.toks.get(self.pos).map_or(&Tok::End, |t| &t.0)
    }
    fn column(&self) -> usize {
        self.toks.get(self.pos).map_or(0, |t| t.1)
    }
    fn next(&mut self) -> (Tok, usize) {
        let t = self.toks.get(self.pos).cloned().unwrap_or((Tok::End, 0));
        self.pos += 1;
        t
    }
    fn err<T>(&self, message: String) -> Result<T, RuleError> {
        Err(RuleError { column: self.column(), message })
    }
    fn keyword(&self, word: &str) -> bool {
        matches!(self.peek(), Tok::Ident(i) if i.eq_ignore_ascii_case(word))
    }
    /// One level deeper (an error past [`MAX_NESTING`]); [`Parser::leave`] when it is parsed.
    fn enter(&mut self, column: usize) -> Result<(), RuleError> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err(RuleError { column, message: format!("the rule nests more than {MAX_NESTING} levels deep") });
        }
        Ok(())
    }
    fn leave(&mut self) {
        self.depth -= 1;
    }

    fn or(&mut self) -> Result<Expr, RuleError> {
        let mut items = vec![self.and()?];
        while self.keyword("or") || *self.peek() == Tok::Op("||") {
            self.next();
            items.push(self.and()?);
        }
        Ok(if items.len() == 1 { items.remove(0) } else { Expr::Or(items) })
    }

    fn and(&mut self) -> Result<Expr, RuleError> {
        let mut items = vec![self.unary()?];
        while self.keyword("and") || *self.peek() == Tok::Op("&&") {
            self.next();
            items.push(self.unary()?);
        }
        Ok(if items.len() == 1 { items.remove(0) } else { Expr::And(items) })
    }

    fn unary(&mut self) -> Result<Expr, RuleError> {
        if self.keyword("not") || *self.peek() == Tok::Op("!") {
            let (_, column) = self.next();
            self.enter(column)?;
            let inner = self.unary()?;
            self.leave();
            return Ok(Expr::Not(Box::new(inner)));
        }
        self.cmp()
    }

    fn cmp(&mut self) -> Result<Expr, RuleError> {
        let left = self.primary()?;
        let op = match self.peek() {
            Tok::Op("==") => CmpOp::Eq,
            Tok::Op("!=") => CmpOp::Ne,
            Tok::Op(">=") => CmpOp::Ge,
            Tok::Op("<=") => CmpOp::Le,
            Tok::Op(">") => CmpOp::Gt,
            Tok::Op("<") => CmpOp::Lt,
            _ if self.keyword("in") => CmpOp::In,
            _ if self.keyword("contains") => CmpOp::Contains,
            _ => return Ok(left),
        };
        self.next();
        let right = self.primary()?;
        Ok(Expr::Cmp(op, Box::new(left), Box::new(right)))
    }

    fn primary(&mut self) -> Result<Expr, RuleError> {
        let (tok, column) = self.next();
        match tok {
            Tok::Num(n) => Ok(Expr::Lit(Val::Num(n))),
            Tok::Op("-") => match self.next() {
                (Tok::Num(n), _) => Ok(Expr::Lit(Val::Num(-n))),
                (t, c) => Err(RuleError { column: c, message: format!("expected a number after `-`, found {t}") }),
            },
            Tok::Str(s) => Ok(Expr::Lit(Val::Str(s))),
            Tok::Dur(d) => Ok(Expr::Lit(Val::Dur(d))),
            Tok::LParen => {
                self.enter(column)?;
                let e = self.or()?;
                self.leave();
                match self.next() {
                    (Tok::RParen, _) => Ok(e),
                    (t, c) => Err(RuleError { column: c, message: format!("expected `)`, found {t}") }),
                }
            }
            Tok::LBracket => {
                self.enter(column)?;
                let mut items = Vec::new();
                if *self.peek() != Tok::RBracket {
                    loop {
                        items.push(self.primary()?);
                        if *self.peek() == Tok::Comma {
                            self.next();
                        } else {
                            break;
                        }
                    }
                }
                self.leave();
                match self.next() {
                    (Tok::RBracket, _) => Ok(Expr::List(items)),
                    (t, c) => Err(RuleError { column: c, message: format!("expected `,` or `]`, found {t}") }),
                }
            }
            Tok::Ident(word) => {
                let lower = word.to_ascii_lowercase();
                match lower.as_str() {
                    "true" => return Ok(Expr::Lit(Val::Bool(true))),
                    "false" => return Ok(Expr::Lit(Val::Bool(false))),
                    "null" => return Ok(Expr::Lit(Val::Null)),
                    "and" | "or" | "in" | "contains" => {
                        return Err(RuleError { column, message: format!("expected a value, found `{word}`") })
                    }
                    _ => {}
                }
                if *self.peek() == Tok::LParen {
                    self.next();
                    self.enter(column)?;
                    let mut args = Vec::new();
                    if *self.peek() != Tok::RParen {
                        loop {
                            args.push(self.or()?);
                            if *self.peek() == Tok::Comma {
                                self.next();
                            } else {
                                break;
                            }
                        }
                    }
                    self.leave();
                    return match self.next() {
                        (Tok::RParen, _) => Ok(Expr::Call { name: lower, args, column }),
                        (t, c) => Err(RuleError { column: c, message: format!("expected `,` or `)`, found {t}") }),
                    };
                }
                let mut parts = vec![word];
                while *self.peek() == Tok::Dot {
                    self.next();
                    match self.next() {
                        (Tok::Ident(p), _) => parts.push(p),
                        (t, c) => {
                            return Err(RuleError {
                                column: c,
                                message: format!("expected a name after `.`, found {t}"),
                            })
                        }
                    }
                }
                Ok(Expr::Path { parts, column })
            }
            Tok::End => Err(RuleError { column, message: "the rule ends where a value was expected".into() }),
            other => Err(RuleError { column, message: format!("expected a value, found {other}") }),
        }
    }
}

/// What an argument of a function must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arg {
    Text,
    Window,
}

/// The functions of the language: name, required arguments, optional trailing arguments.
const FUNCTIONS: &[(&str, &[Arg], &[Arg], &str)] = &[
    ("page_count", &[Arg::Text], &[Arg::Window], "page and screen views with a topic (path word or category)"),
    ("page_views", &[], &[Arg::Window], "all page and screen views"),
    ("event_count", &[Arg::Text], &[Arg::Window], "track events with a name"),
    ("email_opens", &[], &[Arg::Window], "email opens"),
    ("email_clicks", &[], &[Arg::Window], "email clicks"),
    ("login_count", &[], &[Arg::Window], "logins"),
    ("assignments_completed", &[], &[Arg::Window], "completed or submitted assignments"),
    ("days_since_last_login", &[], &[], "whole days since the last login (null: never)"),
    ("days_since", &[Arg::Text], &[], "whole days since a date trait"),
    ("email_engagement", &[], &[], "email engagement score 0-100 (30 days)"),
    ("engagement_score", &[], &[], "engagement score 0-100 (30 days)"),
    ("sentiment", &[], &[], "average WhatsApp sentiment (-1..1, null: none)"),
    ("funnel_stage", &[], &[], "inquiry, application, enrollment, active or alumni"),
    ("score", &[Arg::Text], &[], "a model's score (see [models])"),
    ("has", &[Arg::Text], &[], "whether the profile has an identifier of a kind"),
    ("in_segment", &[Arg::Text], &[], "whether the profile is in another real-time segment"),
];

/// The longest window a rule may use: activity is kept for 90 days.
const MAX_WINDOW_SECS: i64 = 90 * 86_400;

fn validate(e: &Expr, models: &[String]) -> Result<(), RuleError> {
    match e {
        Expr::Or(items) | Expr::And(items) | Expr::List(items) => items.iter().try_for_each(|i| validate(i, models)),
        Expr::Not(inner) => validate(inner, models),
        Expr::Cmp(_, l, r) => {
            // A duration is a window argument only: compared with a number it was always false.
            if let (Expr::Lit(Val::Dur(_)), other) | (other, Expr::Lit(Val::Dur(_))) = (l.as_ref(), r.as_ref()) {
                let column = match other {
                    Expr::Path { column, .. } | Expr::Call { column, .. } => *column,
                    _ => 1,
                };
                return Err(RuleError {
                    column,
                    message: "a duration (7d, 12h) is only a window argument, as in page_count(\"mba\", 7d); \
                              compare days as a number (days_since(\"enrolled_on\") >= 30)"
                        .into(),
                });
            }
            validate(l, models)?;
            validate(r, models)
        }
        Expr::Lit(Val::Dur(_)) => Err(RuleError {
            column: 1,
            message: "a duration (7d, 12h) is only a window argument, as in page_count(\"mba\", 7d)".into(),
        }),
        Expr::Lit(_) => Ok(()),
        Expr::Path { parts, column } => {
            let root = parts[0].as_str();
            let ok = match root {
                "consent" | "computed" | "traits" => parts.len() == 2,
                _ => parts.len() == 1,
            };
            if ok {
                Ok(())
            } else {
                Err(RuleError {
                    column: *column,
                    message: format!(
                        "`{}` is not a field: use a trait name, traits.NAME, consent.CHANNEL or computed.NAME",
                        parts.join(".")
                    ),
                })
            }
        }
        Expr::Call { name, args, column } => {
            let Some((_, required, optional, _)) = FUNCTIONS.iter().find(|(n, ..)| n == name) else {
                let known: Vec<&str> = FUNCTIONS.iter().map(|f| f.0).collect();
                return Err(RuleError {
                    column: *column,
                    message: format!("unknown function `{name}` (known: {})", known.join(", ")),
                });
            };
            if args.len() < required.len() || args.len() > required.len() + optional.len() {
                let n = required.len();
                let m = n + optional.len();
                let want = if n == m { format!("{n}") } else { format!("{n} to {m}") };
                return Err(RuleError {
                    column: *column,
                    message: format!("`{name}` takes {want} arguments, not {}", args.len()),
                });
            }
            for (arg, kind) in args.iter().zip(required.iter().chain(optional.iter())) {
                match (kind, arg) {
                    (Arg::Text, Expr::Lit(Val::Str(_))) => {}
                    (Arg::Window, Expr::Lit(Val::Dur(d))) if *d > 0 && *d <= MAX_WINDOW_SECS => {}
                    (Arg::Window, Expr::Lit(Val::Dur(_))) => {
                        return Err(RuleError {
                            column: *column,
                            message: format!("`{name}`: a window must be between 1s and 90d"),
                        })
                    }
                    (Arg::Text, _) => {
                        return Err(RuleError { column: *column, message: format!("`{name}` expects a string here") })
                    }
                    (Arg::Window, _) => {
                        return Err(RuleError {
                            column: *column,
                            message: format!("`{name}` expects a window such as 7d or 12h here"),
                        })
                    }
                }
            }
            if name == "score" {
                if let Some(Expr::Lit(Val::Str(model))) = args.first() {
                    if !models.contains(model) {
                        return Err(RuleError {
                            column: *column,
                            message: format!("unknown model `{model}` (configured: {})", models.join(", ")),
                        });
                    }
                }
            }
            Ok(())
        }
    }
}

/// Parses and validates a rule; `models` are the scorers `score("...")` may name.
pub fn compile(rule: &str, models: &[String]) -> Result<Expr, RuleError> {
    let toks = lex(rule)?;
    let mut p = Parser { toks, pos: 0, depth: 0 };
    let e = p.or()?;
    if *p.peek() != Tok::End {
        return p.err(format!("expected `and`, `or` or the end of the rule, found {}", p.peek()));
    }
    validate(&e, models)?;
    Ok(e)
}

/// What a rule reads of a profile. Implemented over a profile record and its computed traits.
pub trait Facts {
    fn now(&self) -> DateTime<Utc>;
    /// Timestamps (oldest first) of an activity key since `since`.
    fn activity_since(&self, key: &str, since: DateTime<Utc>) -> Vec<DateTime<Utc>>;
    fn field(&self, root: Option<&str>, name: &str) -> Val;
    /// A function without a window argument (`days_since_last_login`, `score`, ...).
    fn call(&self, name: &str, arg: Option<&str>) -> Val;
}

/// Evaluates a rule. `next_change` is lowered to the earliest time at which a windowed count in
/// the rule will drop by itself (or a day count will tick), so the caller can evaluate again then.
pub fn eval(e: &Expr, facts: &dyn Facts, next_change: &mut Option<DateTime<Utc>>) -> Val {
    match e {
        Expr::Or(items) => Val::Bool(items.iter().any(|i| eval(i, facts, next_change).truthy())),
        Expr::And(items) => Val::Bool(items.iter().all(|i| eval(i, facts, next_change).truthy())),
        Expr::Not(inner) => Val::Bool(!eval(inner, facts, next_change).truthy()),
        Expr::Lit(v) => v.clone(),
        Expr::List(items) => Val::List(items.iter().map(|i| eval(i, facts, next_change)).collect()),
        Expr::Path { parts, .. } => match parts.as_slice() {
            [name] => facts.field(None, name),
            [root, name] => facts.field(Some(root), name),
            _ => Val::Null,
        },
        Expr::Cmp(op, l, r) => {
            let (a, b) = (eval(l, facts, next_change), eval(r, facts, next_change));
            Val::Bool(compare(*op, &a, &b))
        }
        Expr::Call { name, args, .. } => {
            let text = args.iter().find_map(|a| match a {
                Expr::Lit(Val::Str(s)) => Some(s.as_str()),
                _ => None,
            });
            let window = args.iter().find_map(|a| match a {
                Expr::Lit(Val::Dur(d)) => Some(*d),
                _ => None,
            });
            let key = match name.as_str() {
                "page_count" => text.map(|t| format!("page:{}", cohort_messages::profile::fold_key(t))),
                "page_views" => Some("page".to_string()),
                "event_count" => text.map(|t| format!("event:{}", cohort_messages::profile::fold_key(t))),
                "email_opens" => Some("email:open".to_string()),
                "email_clicks" => Some("email:click".to_string()),
                "login_count" => Some("login".to_string()),
                _ => None,
            };
            if name == "assignments_completed" {
                let mut total = 0.0;
                for k in ["event:assignment completed", "event:assignment submitted"] {
                    total += count(facts, k, window, next_change);
                }
                return Val::Num(total);
            }
            match key {
                Some(k) => Val::Num(count(facts, &k, window, next_change)),
                None => {
                    let v = facts.call(name, text);
                    // Day counts are whole days (as documented: `== 3` holds for a whole day),
                    // and tick over at the next whole day since their reference.
                    if let (Val::Num(days), true) = (&v, name.starts_with("days_since")) {
                        let tick =
                            facts.now() + Duration::seconds(((days.floor() + 1.0 - days) * 86_400.0).ceil() as i64);
                        lower(next_change, tick);
                        return Val::Num(days.floor());
                    }
                    v
                }
            }
        }
    }
}

fn lower(next: &mut Option<DateTime<Utc>>, at: DateTime<Utc>) {
    *next = Some(next.map_or(at, |n| n.min(at)));
}

/// Counts activity in the window (all kept activity without one) and notes when the oldest
/// counted item will leave the window.
fn count(facts: &dyn Facts, key: &str, window: Option<i64>, next_change: &mut Option<DateTime<Utc>>) -> f64 {
    let now = facts.now();
    let span = Duration::seconds(window.unwrap_or(MAX_WINDOW_SECS));
    let items = facts.activity_since(key, now - span);
    if let Some(oldest) = items.first() {
        lower(next_change, *oldest + span);
    }
    items.len() as f64
}

fn compare(op: CmpOp, a: &Val, b: &Val) -> bool {
    use std::cmp::Ordering;
    let eq = |x: &Val, y: &Val| match (x, y) {
        (Val::Str(s), Val::Str(t)) => s.eq_ignore_ascii_case(t),
        (Val::Num(m), Val::Num(n)) => (m - n).abs() < 1e-9,
        (Val::Num(m), Val::Str(s)) | (Val::Str(s), Val::Num(m)) => {
            s.trim().parse::<f64>().is_ok_and(|n| (m - n).abs() < 1e-9)
        }
        _ => x == y,
    };
    let order = |x: &Val, y: &Val| -> Option<Ordering> {
        match (x, y) {
            (Val::Num(m), Val::Num(n)) => m.partial_cmp(n),
            (Val::Num(m), Val::Str(s)) => s.trim().parse::<f64>().ok().and_then(|n| m.partial_cmp(&n)),
            (Val::Str(s), Val::Num(n)) => s.trim().parse::<f64>().ok().and_then(|m| m.partial_cmp(n)),
            (Val::Str(s), Val::Str(t)) => Some(s.to_lowercase().cmp(&t.to_lowercase())),
            (Val::Dur(m), Val::Dur(n)) => Some(m.cmp(n)),
            _ => None,
        }
    };
    match op {
        CmpOp::Eq => eq(a, b),
        CmpOp::Ne => !eq(a, b),
        CmpOp::Ge => order(a, b).is_some_and(Ordering::is_ge),
        CmpOp::Le => order(a, b).is_some_and(Ordering::is_le),
        CmpOp::Gt => order(a, b).is_some_and(Ordering::is_gt),
        CmpOp::Lt => order(a, b).is_some_and(Ordering::is_lt),
        CmpOp::In => match b {
            Val::List(items) => items.iter().any(|i| eq(a, i)),
            Val::Str(s) => matches!(a, Val::Str(t) if s.to_lowercase().contains(&t.to_lowercase())),
            _ => false,
        },
        CmpOp::Contains => match a {
            Val::List(items) => items.iter().any(|i| eq(i, b)),
            Val::Str(s) => matches!(b, Val::Str(t) if s.to_lowercase().contains(&t.to_lowercase())),
            _ => false,
        },
    }
}

/// The functions, for documentation and error messages.
pub fn functions() -> impl Iterator<Item = (&'static str, &'static str)> {
    FUNCTIONS.iter().map(|(n, _, _, doc)| (*n, *doc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct F {
        now: DateTime<Utc>,
        activity: HashMap<String, Vec<DateTime<Utc>>>,
        fields: HashMap<String, Val>,
    }

    impl Facts for F {
        fn now(&self) -> DateTime<Utc> {
            self.now
        }
        fn activity_since(&self, key: &str, since: DateTime<Utc>) -> Vec<DateTime<Utc>> {
            self.activity.get(key).map(|l| l.iter().copied().filter(|t| *t >= since).collect()).unwrap_or_default()
        }
        fn field(&self, root: Option<&str>, name: &str) -> Val {
            let key = root.map_or(name.to_string(), |r| format!("{r}.{name}"));
            self.fields.get(&key).cloned().unwrap_or(Val::Null)
        }
        fn call(&self, name: &str, _arg: Option<&str>) -> Val {
            match name {
                "days_since_last_login" => Val::Num(2.5),
                _ => Val::Null,
            }
        }
    }

    fn facts(views: &[i64]) -> F {
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let at = |days: i64| now - Duration::days(days);
        F {
            now,
            activity: HashMap::from([("page:mba".to_string(), views.iter().map(|d| at(*d)).collect())]),
            fields: HashMap::from([
                ("enrollment_status".to_string(), Val::Str("Inquiry".into())),
                ("consent.email".to_string(), Val::Bool(true)),
                ("consent.whatsapp".to_string(), Val::Bool(false)),
            ]),
        }
    }

    /// A duration outside a window argument is refused when the rule is defined: compared
    /// with a number it could never hold.
    #[test]
    fn a_duration_is_only_a_window_argument() {
        for rule in [r#"days_since("enrolled_on") >= 30d"#, "7d", r#"page_views(7d) > 2d"#] {
            let e = compile(rule, &[]).unwrap_err();
            assert!(e.message.contains("only a window argument"), "{rule}: {}", e.message);
        }
        assert!(compile(r#"days_since("enrolled_on") >= 30 and page_count("mba", 7d) >= 1"#, &[]).is_ok());
    }

    #[test]
    fn the_slide_11_rule_holds_and_says_when_it_will_stop_holding() {
        let rule = r#"page_count("MBA", 7d) >= 3 and enrollment_status == "inquiry" and consent.email"#;
        let e = compile(rule, &[]).unwrap_or_else(|err| panic!("{err}"));
        let f = facts(&[6, 3, 1, 20]);
        let mut next = None;
        assert_eq!(eval(&e, &f, &mut next), Val::Bool(true));
        // The view six days ago leaves the 7-day window in one day.
        assert_eq!(next, Some(f.now + Duration::days(1)));
        let mut next = None;
        assert_eq!(eval(&e, &facts(&[6, 3]), &mut next), Val::Bool(false));
        let e = compile("not consent.whatsapp and (days_since_last_login() >= 2 || 1 > 2)", &[]).unwrap();
        let mut next = None;
        assert!(eval(&e, &f, &mut next).truthy());
        assert_eq!(next, Some(f.now + Duration::hours(12)), "the day count ticks at 3 days");
        // Whole days: 2.5 days since the last login is day 2 until it is day 3.
        for (rule, holds) in [("days_since_last_login() == 2", true), ("days_since_last_login() > 2", false)] {
            assert_eq!(eval(&compile(rule, &[]).unwrap(), &f, &mut None).truthy(), holds, "{rule}");
        }
        let e = compile("sentiment() < -0.25 or -1 > 2", &[]).unwrap();
        assert!(!eval(&e, &f, &mut None).truthy(), "no sentiment: null compares false");
        let e = compile(r#"enrollment_status in ["applicant", "INQUIRY"]"#, &[]).unwrap();
        assert!(eval(&e, &f, &mut None).truthy());
    }

    #[test]
    fn errors_point_at_the_column() {
        let err = |rule: &str| compile(rule, &["churn_risk".to_string()]).err().map(|e| (e.column, e.message));
        let (col, msg) = err(r#"page_count("mba", 7d) >= and x"#).unwrap();
        assert_eq!(col, 26, "{msg}");
        assert!(msg.contains("expected a value"), "{msg}");
        let (col, msg) = err(r#"page_cnt("mba") > 1"#).unwrap();
        assert_eq!(col, 1);
        assert!(msg.contains("unknown function `page_cnt`"), "{msg}");
        let (col, msg) = err(r#"x == "open"#).unwrap();
        assert_eq!((col, msg.as_str()), (6, "unterminated string"));
        let (_, msg) = err(r#"page_count("mba", 7x) > 1"#).unwrap();
        assert!(msg.contains("unknown duration unit"), "{msg}");
        let (_, msg) = err(r#"page_count(7d) > 1"#).unwrap();
        assert!(msg.contains("expects a string"), "{msg}");
        let (_, msg) = err(r#"page_count("mba", 100d) > 1"#).unwrap();
        assert!(msg.contains("between 1s and 90d"), "{msg}");
        let (_, msg) = err(r#"score("dropout") > 0.5"#).unwrap();
        assert!(msg.contains("unknown model"), "{msg}");
        assert!(compile(r#"score("churn_risk") > 0.75"#, &["churn_risk".to_string()]).is_ok());
        let (col, msg) = err("a == 1 b").unwrap();
        assert_eq!(col, 8, "{msg}");
        let (_, msg) = err("traits.a.b == 1").unwrap();
        assert!(msg.contains("is not a field"), "{msg}");
        assert_eq!(err("(a == 1").map(|e| e.0), Some(8));
        assert!(err("").unwrap().1.contains("ends where a value"));
    }
}
