//! Step fields are Jinja templates (minijinja), filled from the event and the results of
//! earlier steps. Undefined variables are errors, at check time and at run time: a typo
//! never becomes an empty path.

use std::sync::OnceLock;

use minijinja::{Environment, UndefinedBehavior};
use serde_json::Value;

fn env() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        // Paths and arguments are not HTML.
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env
    })
}

/// Fills `source` from `context` (`event`, `rule`, `run`, `steps`).
pub fn render(source: &str, context: &Value) -> Result<String, String> {
    env()
        .render_str(source, minijinja::value::Serde(context))
        .map_err(|e| describe(&e))
}

/// Parses `source` and checks each variable it reads (`event.payload.name`, dotted) with
/// `variable`.
pub fn check(source: &str, variable: impl Fn(&str) -> Result<(), String>) -> Result<(), String> {
    let template = env().template_from_str(source).map_err(|e| describe(&e))?;
    let mut vars: Vec<String> = template.undeclared_variables(true).into_iter().collect();
    vars.sort();
    for var in vars {
        variable(&var)?;
    }
    Ok(())
}

fn describe(e: &minijinja::Error) -> String {
    let mut text = e.to_string();
    if let Some(detail) = e.detail() {
        if !text.contains(detail) {
            text.push_str(": ");
            text.push_str(detail);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn templates_fill_from_the_event() {
        let ctx = json!({"event": {"id": "e1", "payload": {"name": "a.csv", "size": 3}}});
        assert_eq!(
            render("/out/{{ event.payload.name }}.{{ event.id }}", &ctx).unwrap(),
            "/out/a.csv.e1"
        );
        assert_eq!(
            render(
                "{{ event.payload.name | upper }} {{ event.payload.size * 2 }}",
                &ctx
            )
            .unwrap(),
            "A.CSV 6"
        );
        assert_eq!(render("<&>", &ctx).unwrap(), "<&>");
    }

    #[test]
    fn an_undefined_variable_is_an_error_not_an_empty_string() {
        let ctx = json!({"event": {"payload": {}}});
        let e = render("/out/{{ event.payload.nmae }}", &ctx).unwrap_err();
        assert!(e.contains("undefined"), "{e}");
    }

    #[test]
    fn check_reports_each_variable_and_syntax_errors() {
        let mut seen = Vec::new();
        let seen_cell = std::cell::RefCell::new(&mut seen);
        check("{{ event.payload.a }}-{{ steps.get.path }}", |v| {
            seen_cell.borrow_mut().push(v.to_string());
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, ["event.payload.a", "steps.get.path"]);
        let e = check("{{ event.payload.a ", |_| Ok(())).unwrap_err();
        assert!(e.contains("syntax error"), "{e}");
        let e = check("{{ nope }}", |v| Err(format!("bad {v}"))).unwrap_err();
        assert_eq!(e, "bad nope");
    }
}
