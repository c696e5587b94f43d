//! A request's query parameters, checked against the names its route
//! takes, and the pages (`limit`, `after`) the long answers come in.
//!
//! A misspelt parameter is refused, not ignored (`group=device` would
//! answer by account, and look like an answer); so is a second value
//! (only the first was read, so `…&to=X` added to a query that had a `to`
//! answered for the old one) and a name with no `=` (read as absent, so
//! `group_by` alone answered by account).

use crate::dataplane::http;

/// The query of a request, once [`checked`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Query<'a>(&'a str);

/// `query` if every parameter in it is one of `known` (a name, and what
/// it takes, for the error), given once, with a value; else the 400
/// answer that says which is not.
pub(super) fn checked<'a>(query: &'a str, known: &[(&str, &str)]) -> Result<Query<'a>, Vec<u8>> {
    let name_of = |kv: &'a str| kv.split_once('=').map_or(kv, |(k, _)| k);
    let params = || query.split('&').filter(|kv| !kv.is_empty());
    if let Some(k) = params()
        .map(name_of)
        .find(|k| !known.iter().any(|(n, _)| n == k))
    {
        let names: Vec<&str> = known.iter().map(|(n, _)| *n).collect();
        // Named only when it looks like a parameter's name: a key or a
        // token pasted as the query (`?KEY`, the name forgotten) is not
        // repeated.
        let named = k.len() <= 32 && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
        let k = if named {
            k
        } else {
            "(not shown: it may be a secret)"
        };
        return Err(http::json_error(
            400,
            &format!("unknown parameter {k} ({})", names.join(", ")),
        ));
    }
    if let Some((name, _)) = known
        .iter()
        .find(|(name, _)| params().filter(|kv| name_of(kv) == *name).count() > 1)
    {
        return Err(http::json_error(400, &format!("{name} is given twice")));
    }
    if let Some((name, takes)) = known
        .iter()
        .find(|(name, _)| params().any(|kv| kv == *name))
    {
        return Err(http::json_error(
            400,
            &format!("{name}: want {name}={takes}"),
        ));
    }
    Ok(Query(query))
}

impl<'a> Query<'a> {
    /// The value of `name`, as sent (not percent-decoded); `None` when
    /// absent.
    pub(super) fn get(&self, name: &str) -> Option<&'a str> {
        self.0
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
    }

    /// The page asked for: `limit` (1 to `max`, `default` when absent) and
    /// `after` (percent-decoded; `None` when absent or empty).
    pub(super) fn page(
        &self,
        default: usize,
        max: usize,
    ) -> Result<(usize, Option<String>), Vec<u8>> {
        let limit = match self.get("limit") {
            None => default,
            Some(t) => match t.parse::<usize>() {
                Ok(n) if (1..=max).contains(&n) => n,
                _ => {
                    return Err(http::json_error(
                        400,
                        &format!("limit: want a number of rows, 1 to {max}"),
                    ))
                }
            },
        };
        let after = match self
            .get("after")
            .map(|t| percent_encoding::percent_decode_str(t).decode_utf8())
        {
            None => None,
            Some(Ok(t)) if t.is_empty() => None,
            Some(Ok(t)) => Some(t.into_owned()),
            Some(Err(_)) => return Err(http::json_error(400, "after: not UTF-8")),
        };
        Ok((limit, after))
    }
}
