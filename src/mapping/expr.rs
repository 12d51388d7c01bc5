//! The expression language of mapping files.
//!
//! **Values** (`from:` and `id:`): alternatives separated by `|`, the first non-empty wins:
//! `PID-3.4.2 | PID-3.4.1 | MSH-4.1 | "LOCAL"`. Each alternative is a path or a quoted
//! literal.
//!
//! **Conditions** (`when:`), with parentheses, `and`, `or`, `not`:
//! - `valued(PID-29)` — has data in any component (the HL7 null `""` is not a value);
//! - `null(PID-29)` — holds the HL7 null `""` ("delete");
//! - `PID-8 = "M"`, `PID-8 != "M"`, `<`, `<=`, `>`, `>=` (numeric when both sides are
//!   numbers, else text);
//! - `PID-8 in ("M", "F")`, `PID-8 not in ("M", "F")` (case-sensitive);
//! - `count(PID-3) > 1` — repetitions of a field, or `count(NK1)` occurrences of a segment.
//!
//! A token that starts with a digit is a relative path (`4.3 = "ISO"` inside a datatype
//! map); numbers to compare with are quoted (`OBX-5 > "100"`), except after `count(...)`.

use super::path::Path;

/// One `|` alternative.
#[derive(Clone, Debug, PartialEq)]
pub enum Alternative {
    /// Read from the message.
    Path(Path),
    /// A literal.
    Literal(String),
}

/// A value expression: alternatives, first non-empty wins.
#[derive(Clone, Debug, PartialEq)]
pub struct ValueExpr {
    /// The alternatives in order.
    pub alternatives: Vec<Alternative>,
}

impl ValueExpr {
    /// Parses `A | B | "literal"`.
    pub fn parse(text: &str) -> Result<ValueExpr, String> {
        let mut alternatives = Vec::new();
        for part in split_top_level(text, '|') {
            let part = part.trim();
            if part.is_empty() {
                return Err(format!("`{text}`: empty alternative around `|`"));
            }
            if let Some(literal) = quoted(part) {
                alternatives.push(Alternative::Literal(literal));
            } else {
                alternatives.push(Alternative::Path(Path::parse(part)?));
            }
        }
        Ok(ValueExpr { alternatives })
    }

    /// True when some alternative iterates.
    pub fn iterates(&self) -> bool {
        self.alternatives.iter().any(|alternative| matches!(alternative, Alternative::Path(path) if path.iterates()))
    }
}

/// Splits on `separator` outside of double quotes.
fn split_top_level(text: &str, separator: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut in_quotes = false;
    let mut start = 0;
    for (index, character) in text.char_indices() {
        if character == '"' {
            in_quotes = !in_quotes;
        } else if character == separator && !in_quotes {
            parts.push(&text[start..index]);
            start = index + 1;
        }
    }
    parts.push(&text[start..]);
    parts
}

fn quoted(text: &str) -> Option<String> {
    let inner = text.strip_prefix('"')?.strip_suffix('"')?;
    Some(inner.replace("\\\"", "\""))
}

/// Comparison operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comparison {
    /// `=`
    Equal,
    /// `!=`
    NotEqual,
    /// `<`
    Less,
    /// `<=`
    LessOrEqual,
    /// `>`
    Greater,
    /// `>=`
    GreaterOrEqual,
}

impl Comparison {
    fn holds(self, left: &str, right: &str) -> bool {
        let ordering = match (left.trim().parse::<f64>(), right.trim().parse::<f64>()) {
            (Ok(left_number), Ok(right_number)) => left_number.partial_cmp(&right_number),
            _ => Some(left.cmp(right)),
        };
        let Some(ordering) = ordering else { return false };
        match self {
            Comparison::Equal => ordering.is_eq(),
            Comparison::NotEqual => !ordering.is_eq(),
            Comparison::Less => ordering.is_lt(),
            Comparison::LessOrEqual => ordering.is_le(),
            Comparison::Greater => ordering.is_gt(),
            Comparison::GreaterOrEqual => ordering.is_ge(),
        }
    }
}

/// A condition.
#[derive(Clone, Debug, PartialEq)]
pub enum Condition {
    /// `a and b`
    And(Box<Condition>, Box<Condition>),
    /// `a or b`
    Or(Box<Condition>, Box<Condition>),
    /// `not a`
    Not(Box<Condition>),
    /// `valued(x)`
    Valued(ValueExpr),
    /// `null(x)`
    Null(Path),
    /// `x op y`
    Compare(ValueExpr, Comparison, ValueExpr),
    /// `x in (...)`
    In(ValueExpr, Vec<String>),
    /// `count(x) op n`
    Count(CountTarget, Comparison, f64),
}

/// What `count()` counts.
#[derive(Clone, Debug, PartialEq)]
pub enum CountTarget {
    /// Repetitions of the field at a path.
    Repetitions(Path),
    /// Occurrences of a segment in scope.
    Segments(String),
}

/// What conditions need from the message.
pub trait Lookup {
    /// The first non-empty text of a value expression (unescaped), if any.
    fn text(&self, value: &ValueExpr) -> Option<String>;
    /// True when the value expression yields data anywhere (any component of a field).
    fn valued(&self, value: &ValueExpr) -> bool {
        self.text(value).is_some()
    }
    /// True when the value at `path` is the HL7 null `""`.
    fn is_null(&self, path: &Path) -> bool;
    /// How many repetitions or segments.
    fn count(&self, target: &CountTarget) -> usize;
}

impl Condition {
    /// Parses a condition.
    pub fn parse(text: &str) -> Result<Condition, String> {
        let tokens = tokenize(text)?;
        let mut parser = Parser { tokens: &tokens, position: 0, text };
        let condition = parser.or_expression()?;
        if parser.position != tokens.len() {
            return Err(format!("`{text}`: unexpected `{}`", tokens[parser.position].describe()));
        }
        Ok(condition)
    }

    /// Evaluates against a message scope.
    pub fn holds(&self, lookup: &dyn Lookup) -> bool {
        match self {
            Condition::And(left, right) => left.holds(lookup) && right.holds(lookup),
            Condition::Or(left, right) => left.holds(lookup) || right.holds(lookup),
            Condition::Not(inner) => !inner.holds(lookup),
            Condition::Valued(value) => lookup.valued(value),
            Condition::Null(path) => lookup.is_null(path),
            Condition::Compare(left, comparison, right) => {
                let left_text = lookup.text(left).unwrap_or_default();
                let right_text = lookup.text(right).unwrap_or_default();
                comparison.holds(&left_text, &right_text)
            }
            Condition::In(value, options) => lookup.text(value).is_some_and(|text| options.contains(&text)),
            Condition::Count(target, comparison, number) => {
                comparison.holds(&lookup.count(target).to_string(), &number.to_string())
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Word(String),
    Literal(String),
    Open,
    Close,
    Comma,
    Operator(Comparison),
}

impl Token {
    fn describe(&self) -> String {
        match self {
            Token::Word(word) => word.clone(),
            Token::Literal(literal) => format!("\"{literal}\""),
            Token::Open => "(".into(),
            Token::Close => ")".into(),
            Token::Comma => ",".into(),
            Token::Operator(operator) => format!("{operator:?}"),
        }
    }
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let characters: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut index = 0;
    while index < characters.len() {
        let character = characters[index];
        match character {
            ' ' | '\t' | '\n' => index += 1,
            '(' => {
                tokens.push(Token::Open);
                index += 1;
            }
            ')' => {
                tokens.push(Token::Close);
                index += 1;
            }
            ',' => {
                tokens.push(Token::Comma);
                index += 1;
            }
            '"' => {
                let start = index + 1;
                let mut end = start;
                while end < characters.len() && characters[end] != '"' {
                    end += 1;
                }
                if end == characters.len() {
                    return Err(format!("`{text}`: unterminated string"));
                }
                tokens.push(Token::Literal(characters[start..end].iter().collect()));
                index = end + 1;
            }
            '=' => {
                tokens.push(Token::Operator(Comparison::Equal));
                index += if characters.get(index + 1) == Some(&'=') { 2 } else { 1 };
            }
            '!' | '<' | '>' => {
                let followed_by_equal = characters.get(index + 1) == Some(&'=');
                let operator = match (character, followed_by_equal) {
                    ('!', true) => Comparison::NotEqual,
                    ('<', false) => Comparison::Less,
                    ('<', true) => Comparison::LessOrEqual,
                    ('>', false) => Comparison::Greater,
                    ('>', true) => Comparison::GreaterOrEqual,
                    _ => return Err(format!("`{text}`: `!` must be followed by `=`")),
                };
                tokens.push(Token::Operator(operator));
                index += if followed_by_equal { 2 } else { 1 };
            }
            _ if character.is_ascii_alphanumeric() || character == '_' => {
                let start = index;
                while index < characters.len()
                    && (characters[index].is_ascii_alphanumeric() || "-._[]*".contains(characters[index]))
                {
                    index += 1;
                }
                tokens.push(Token::Word(characters[start..index].iter().collect()));
            }
            other => return Err(format!("`{text}`: unexpected character `{other}`")),
        }
    }
    Ok(tokens)
}

struct Parser<'a> {
    tokens: &'a [Token],
    position: usize,
    text: &'a str,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.position)
    }

    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.position).cloned();
        self.position += 1;
        token
    }

    fn is_word(&self, word: &str) -> bool {
        matches!(self.peek(), Some(Token::Word(found)) if found == word)
    }

    fn expect(&mut self, expected: Token) -> Result<(), String> {
        match self.next() {
            Some(found) if found == expected => Ok(()),
            Some(found) => {
                Err(format!("`{}`: expected `{}`, found `{}`", self.text, expected.describe(), found.describe()))
            }
            None => Err(format!("`{}`: expected `{}` at the end", self.text, expected.describe())),
        }
    }

    fn or_expression(&mut self) -> Result<Condition, String> {
        let mut left = self.and_expression()?;
        while self.is_word("or") {
            self.position += 1;
            let right = self.and_expression()?;
            left = Condition::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and_expression(&mut self) -> Result<Condition, String> {
        let mut left = self.not_expression()?;
        while self.is_word("and") {
            self.position += 1;
            let right = self.not_expression()?;
            left = Condition::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn not_expression(&mut self) -> Result<Condition, String> {
        if self.is_word("not") {
            self.position += 1;
            return Ok(Condition::Not(Box::new(self.not_expression()?)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Condition, String> {
        match self.peek() {
            Some(Token::Open) => {
                self.position += 1;
                let inner = self.or_expression()?;
                self.expect(Token::Close)?;
                Ok(inner)
            }
            Some(Token::Word(word)) if word == "valued" || word == "null" || word == "count" => {
                let function = word.clone();
                self.position += 1;
                self.expect(Token::Open)?;
                let argument = match self.next() {
                    Some(Token::Word(argument)) => argument,
                    _ => return Err(format!("`{}`: {function}() takes a path", self.text)),
                };
                self.expect(Token::Close)?;
                match function.as_str() {
                    "valued" => Ok(Condition::Valued(ValueExpr::parse(&argument)?)),
                    "null" => Ok(Condition::Null(Path::parse(&argument)?)),
                    _ => {
                        let target = if argument.len() == 3 && !argument.contains('-') {
                            CountTarget::Segments(argument)
                        } else {
                            CountTarget::Repetitions(Path::parse(&argument)?)
                        };
                        let Some(Token::Operator(comparison)) = self.next() else {
                            return Err(format!("`{}`: count() must be compared, e.g. count(PID-3) > 1", self.text));
                        };
                        let number = match self.next() {
                            Some(Token::Word(number)) | Some(Token::Literal(number)) => number
                                .parse::<f64>()
                                .map_err(|_| format!("`{}`: `{number}` is not a number", self.text))?,
                            _ => return Err(format!("`{}`: count() must be compared with a number", self.text)),
                        };
                        Ok(Condition::Count(target, comparison, number))
                    }
                }
            }
            Some(_) => {
                let left = self.operand()?;
                if self.is_word("in") || self.is_word("not") {
                    let negated = self.is_word("not");
                    self.position += 1;
                    if negated {
                        if !self.is_word("in") {
                            return Err(format!("`{}`: expected `in` after `not`", self.text));
                        }
                        self.position += 1;
                    }
                    let options = self.literal_list()?;
                    let condition = Condition::In(left, options);
                    return Ok(if negated { Condition::Not(Box::new(condition)) } else { condition });
                }
                match self.next() {
                    Some(Token::Operator(comparison)) => Ok(Condition::Compare(left, comparison, self.operand()?)),
                    _ => Err(format!("`{}`: expected a comparison (=, !=, <, >, in) after a value", self.text)),
                }
            }
            None => Err(format!("`{}`: condition is incomplete", self.text)),
        }
    }

    fn operand(&mut self) -> Result<ValueExpr, String> {
        match self.next() {
            Some(Token::Word(word)) => ValueExpr::parse(&word),
            Some(Token::Literal(literal)) => Ok(ValueExpr { alternatives: vec![Alternative::Literal(literal)] }),
            Some(other) => {
                Err(format!("`{}`: expected a path or a \"string\", found `{}`", self.text, other.describe()))
            }
            None => Err(format!("`{}`: condition is incomplete", self.text)),
        }
    }

    fn literal_list(&mut self) -> Result<Vec<String>, String> {
        self.expect(Token::Open)?;
        let mut options = Vec::new();
        loop {
            match self.next() {
                Some(Token::Literal(literal)) => options.push(literal),
                _ => return Err(format!("`{}`: `in (...)` takes quoted strings", self.text)),
            }
            match self.next() {
                Some(Token::Comma) => continue,
                Some(Token::Close) => return Ok(options),
                _ => return Err(format!("`{}`: expected `,` or `)` in the list", self.text)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Fixed(HashMap<String, String>);

    impl Lookup for Fixed {
        fn text(&self, value: &ValueExpr) -> Option<String> {
            for alternative in &value.alternatives {
                match alternative {
                    Alternative::Literal(literal) if !literal.is_empty() => return Some(literal.clone()),
                    Alternative::Path(path) => {
                        if let Some(found) =
                            self.0.get(&path.to_string()).filter(|text| !text.is_empty() && *text != "\"\"")
                        {
                            return Some(found.clone());
                        }
                    }
                    Alternative::Literal(_) => {}
                }
            }
            None
        }
        fn is_null(&self, path: &Path) -> bool {
            self.0.get(&path.to_string()).is_some_and(|text| text == "\"\"")
        }
        fn count(&self, _: &CountTarget) -> usize {
            2
        }
    }

    fn lookup() -> Fixed {
        Fixed(HashMap::from([
            ("PID-8".to_string(), "M".to_string()),
            ("PID-29".to_string(), "\"\"".to_string()),
            ("OBX-5".to_string(), "120".to_string()),
        ]))
    }

    #[test]
    fn evaluates_conditions() {
        let cases = [
            ("valued(PID-8)", true),
            ("valued(PID-29)", false),
            ("null(PID-29)", true),
            ("PID-8 = \"M\" and not valued(PID-30)", true),
            ("PID-8 in (\"F\", \"U\") or (count(PID-3) > 1 and PID-8 != \"F\")", true),
            ("PID-8 not in (\"M\")", false),
            ("OBX-5 > \"100\"", true),
            ("OBX-5 <= \"99.5\"", false),
            ("count(NK1) >= 3", false),
        ];
        for (text, expected) in cases {
            let condition = Condition::parse(text).unwrap_or_else(|error| panic!("{text}: {error}"));
            assert_eq!(condition.holds(&lookup()), expected, "{text}");
        }
    }

    #[test]
    fn explains_bad_conditions() {
        for (text, fragment) in [
            ("valued(PID-8", "expected `)`"),
            ("PID-8 = ", "incomplete"),
            ("PID-8 in (M)", "quoted"),
            ("PID-8 \"M\"", "comparison"),
            ("count(PID-3)", "compared"),
            ("PID-8 = \"M\" xor", "unexpected"),
            ("PID-8 = \"M", "unterminated"),
        ] {
            let error = Condition::parse(text).unwrap_err();
            assert!(error.contains(fragment), "{text}: {error}");
        }
    }

    #[test]
    fn value_alternatives_keep_literals_with_pipes() {
        let value = ValueExpr::parse("PID-3.4.2 | MSH-4.1 | \"a|b\"").unwrap();
        assert_eq!(value.alternatives.len(), 3);
        assert_eq!(value.alternatives[2], Alternative::Literal("a|b".to_string()));
    }
}
