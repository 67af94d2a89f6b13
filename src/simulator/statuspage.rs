//! The simulator's Statuspage: what an exchange's Atlassian page would say, at
//! `/__statuspage/{venue}/api/v2/summary.json`, set through [`STATUSPAGE_CONTROL`] (GET the page, PUT changes) and
//! faulted on demand (`500`, `html`, `slow`, `truncated`, `wrong_page_id`, `oversized`), so exwatch's Statuspage
//! watch is tested against the answers a real page gives and the ones it should survive. One page state serves
//! every venue; each venue reports its own page id (`kraken`: status.kraken.com's `lfz25gyhcpjf`).

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Where the page is read and changed.
pub const STATUSPAGE_CONTROL: &str = "/__exwatch/simulator/statuspage";
/// status.kraken.com's page id.
pub const KRAKEN_PAGE_ID: &str = "lfz25gyhcpjf";
/// How long the `slow` fault holds an answer: longer than any fetch timeout exwatch accepts in tests.
const SLOW: Duration = Duration::from_secs(30);
/// The `oversized` fault's body: five times the 1 MiB a client should read.
const OVERSIZED_BYTES: usize = 5 * 1024 * 1024;

/// The page: indicator, components, unresolved incidents, and a fault, if any.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Page {
    pub indicator: String,
    pub description: String,
    pub components: Vec<Component>,
    pub incidents: Vec<Incident>,
    pub fault: Option<Fault>,
    /// Whether Kraken's SystemStatus carries the `emergency` (these incidents) and `upcoming_maintenance` arrays;
    /// Kraken's documentation allows them to be absent.
    pub rest_advisories: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Component {
    pub name: String,
    pub status: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Incident {
    pub name: String,
    #[serde(default = "identified")]
    pub status: String,
    #[serde(default = "major")]
    pub impact: String,
    #[serde(default)]
    pub body: String,
}

fn identified() -> String {
    "identified".to_owned()
}

fn major() -> String {
    "major".to_owned()
}

/// What a faulted page answers instead of its summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fault {
    #[serde(rename = "500")]
    ServerError,
    #[serde(rename = "html")]
    Html,
    #[serde(rename = "slow")]
    Slow,
    #[serde(rename = "truncated")]
    Truncated,
    #[serde(rename = "wrong_page_id")]
    WrongPageId,
    #[serde(rename = "oversized")]
    Oversized,
}

impl Default for Page {
    /// All systems operational, REST and WebSocket components, no incident.
    fn default() -> Page {
        let component = |name: &str| Component { name: name.to_owned(), status: "operational".to_owned() };
        Page {
            indicator: "none".to_owned(),
            description: "All Systems Operational".to_owned(),
            components: vec![component("REST"), component("WebSocket")],
            incidents: Vec::new(),
            fault: None,
            rest_advisories: true,
        }
    }
}

/// A change to the page: each field given replaces the page's (`"fault": null` clears a fault).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Update {
    indicator: Option<String>,
    description: Option<String>,
    components: Option<Vec<Component>>,
    incidents: Option<Vec<Incident>>,
    #[serde(default, deserialize_with = "present")]
    fault: Option<Option<Fault>>,
    rest_advisories: Option<bool>,
}

/// `"fault": null` is a change (clear it), unlike a missing `fault`.
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Option<Fault>>, D::Error> {
    Option::<Fault>::deserialize(deserializer).map(Some)
}

/// The page shared by the simulator's handlers.
#[derive(Debug, Default)]
pub struct State {
    page: Mutex<Page>,
}

impl State {
    pub fn page(&self) -> Page {
        self.page.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub fn update(&self, update: Update) -> Page {
        let mut page = self.page.lock().unwrap_or_else(PoisonError::into_inner);
        let Update { indicator, description, components, incidents, fault, rest_advisories } = update;
        if let Some(rest_advisories) = rest_advisories {
            page.rest_advisories = rest_advisories;
        }
        if let Some(indicator) = indicator {
            page.indicator = indicator;
        }
        if let Some(description) = description {
            page.description = description;
        }
        if let Some(components) = components {
            page.components = components;
        }
        if let Some(incidents) = incidents {
            page.incidents = incidents;
        }
        if let Some(fault) = fault {
            page.fault = fault;
        }
        page.clone()
    }

    /// SystemStatus's advisory arrays as Kraken sends them: the page's unresolved incidents as `emergency[]`, no
    /// upcoming maintenance; `None` when they are switched off.
    pub fn rest_advisories(&self) -> Option<serde_json::Value> {
        let page = self.page();
        if !page.rest_advisories {
            return None;
        }
        let emergency: Vec<_> = page
            .incidents
            .iter()
            .enumerate()
            .map(|(index, incident)| {
                json!({"event_id": 4821 + index, "title": incident.name, "incident_status": incident.status,
                       "impact": incident.impact, "affected_services": ["spot_rest"],
                       "started_at": chrono::Utc::now().to_rfc3339(), "source_url": format!("https://stspg.io/sim{index}")})
            })
            .collect();
        Some(json!({"upcoming_maintenance": [], "emergency": emergency}))
    }

    /// `GET /__statuspage/{venue}/api/v2/summary.json`.
    pub async fn summary(&self, venue: &str) -> Response {
        let page = self.page();
        let page_id = match (page.fault, venue) {
            (Some(Fault::WrongPageId), _) => "wrongpage000".to_owned(),
            (_, "kraken") => KRAKEN_PAGE_ID.to_owned(),
            (_, other) => other.chars().filter(char::is_ascii_alphanumeric).take(32).collect(),
        };
        let body = summary_body(&page, &page_id);
        match page.fault {
            None | Some(Fault::WrongPageId) => json_answer(StatusCode::OK, body),
            Some(Fault::ServerError) => (StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error").into_response(),
            Some(Fault::Html) => {
                let html = "<!DOCTYPE html><html><head><title>Status</title></head><body>Maintenance</body></html>";
                (StatusCode::OK, [("content-type", "text/html; charset=utf-8")], html).into_response()
            }
            Some(Fault::Slow) => {
                tokio::time::sleep(SLOW).await;
                json_answer(StatusCode::OK, body)
            }
            Some(Fault::Truncated) => json_answer(StatusCode::OK, body[..body.len() / 2].to_owned()),
            Some(Fault::Oversized) => {
                let padding = " ".repeat(OVERSIZED_BYTES);
                json_answer(StatusCode::OK, format!("{}{padding}", &body[..body.len() - 1]) + "}")
            }
        }
    }
}

fn json_answer(status: StatusCode, body: String) -> Response {
    (status, [("content-type", "application/json; charset=utf-8")], body).into_response()
}

/// The summary as Statuspage shapes it, with the time zone offsets and extra fields real pages carry.
fn summary_body(page: &Page, page_id: &str) -> String {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let components: Vec<_> = page
        .components
        .iter()
        .enumerate()
        .map(|(index, component)| {
            json!({"id": format!("c{index}"), "name": component.name, "status": component.status,
                   "updated_at": now, "position": index + 1, "showcase": true, "only_show_if_degraded": false})
        })
        .collect();
    let incidents: Vec<_> = page
        .incidents
        .iter()
        .enumerate()
        .map(|(index, incident)| {
            json!({"id": format!("i{index}"), "name": incident.name, "status": incident.status,
                   "impact": incident.impact, "started_at": now, "created_at": now,
                   "shortlink": format!("https://stspg.io/sim{index}"),
                   "incident_updates": [{"status": incident.status, "body": incident.body, "display_at": now}]})
        })
        .collect();
    json!({
        "page": {"id": page_id, "name": "Simulated", "url": "http://simulator.invalid", "time_zone": "Etc/UTC",
                 "updated_at": now},
        "status": {"indicator": page.indicator, "description": page.description},
        "components": components,
        "incidents": incidents,
        "scheduled_maintenances": [],
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_replace_what_they_name_and_null_clears_a_fault() {
        let state = State::default();
        let update: Update = serde_json::from_str(r#"{"indicator":"minor","fault":"html"}"#).unwrap();
        let page = state.update(update);
        assert_eq!((page.indicator.as_str(), page.fault), ("minor", Some(Fault::Html)));
        assert_eq!(page.components.len(), 2, "untouched");
        let page = state.update(serde_json::from_str(r#"{"fault":null}"#).unwrap());
        assert_eq!(page.fault, None);
        assert!(serde_json::from_str::<Update>(r#"{"fault":"teapot"}"#).is_err());
        assert!(serde_json::from_str::<Update>(r#"{"colour":"red"}"#).is_err());
    }

    #[test]
    fn the_summary_is_what_exwatch_reads() {
        let mut page = Page::default();
        page.incidents.push(Incident {
            name: "Elevated errors".into(),
            status: identified(),
            impact: major(),
            body: "x".into(),
        });
        let summary =
            crate::statuspage::parse(summary_body(&page, KRAKEN_PAGE_ID).as_bytes(), Some(KRAKEN_PAGE_ID)).unwrap();
        assert_eq!(summary.indicator, "none");
        assert_eq!(summary.components[0].name, "REST");
        assert_eq!(summary.incidents[0].shortlink.as_deref(), Some("https://stspg.io/sim0"));
    }
}
