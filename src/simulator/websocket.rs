//! The simulator's WebSocket: Kraken's `/v2` `status` channel, on the simulator's listener. Each connection gets a
//! `status` message on connect (with a connection id above 2^53, as Kraken's are) and one whenever the scenario
//! changes what the trading engine says (`maintenance`, `cancel_only`, else `online`), and a pong for every ping.
//! Faults, set through [`WEBSOCKET_CONTROL`]: `ws_drop` closes every connection (and each new one at once),
//! `ws_silent` stops answering pings and sends nothing on connect, `ws_garbage` sends frames that are not JSON.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::ws::{Message, WebSocket};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::Scenario;

/// Where the WebSocket's fault is read and set.
pub const WEBSOCKET_CONTROL: &str = "/__exwatch/simulator/websocket";
/// Kraken's WebSocket v2 path.
pub const WEBSOCKET_PATH: &str = "/v2";
/// The first connection id: above 2^53, so a client reading it through a float loses it.
const FIRST_CONNECTION_ID: u64 = 8_628_615_390_848_610_000;
/// What `ws_garbage` sends.
const GARBAGE: &str = "\u{1}not json {";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    WsDrop,
    WsSilent,
    WsGarbage,
}

/// A control request: the fault, or `null` for none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Update {
    pub fault: Option<Fault>,
}

/// What every connection follows: the engine's status and the fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Live {
    pub system: &'static str,
    pub fault: Option<Fault>,
}

/// What the trading engine says in `scenario`.
pub fn system(scenario: Scenario) -> &'static str {
    match scenario {
        Scenario::Maintenance => "maintenance",
        Scenario::CancelOnly => "cancel_only",
        _ => "online",
    }
}

#[derive(Debug)]
pub struct State {
    live: watch::Sender<Live>,
    connections: AtomicU64,
}

impl State {
    pub fn new(scenario: Scenario) -> State {
        let (live, _) = watch::channel(Live { system: system(scenario), fault: None });
        State { live, connections: AtomicU64::new(0) }
    }

    pub fn live(&self) -> Live {
        *self.live.borrow()
    }

    /// The scenario changed: connections hear of it only when the engine's status did.
    pub fn scenario_changed(&self, scenario: Scenario) {
        let system = system(scenario);
        self.live.send_if_modified(|live| std::mem::replace(&mut live.system, system) != system);
    }

    pub fn update(&self, update: Update) -> Live {
        self.live.send_modify(|live| live.fault = update.fault);
        self.live()
    }

    /// One connection, until the client leaves or `ws_drop` closes it.
    pub async fn serve(&self, mut socket: WebSocket) {
        let mut live = self.live.subscribe();
        let connection_id = FIRST_CONNECTION_ID.wrapping_add(self.connections.fetch_add(1, Ordering::Relaxed));
        let mut current = *live.borrow_and_update();
        match current.fault {
            Some(Fault::WsDrop) => return close(socket).await,
            Some(Fault::WsSilent) => {}
            _ => {
                if socket.send(status(current.system, connection_id)).await.is_err() {
                    return;
                }
            }
        }
        loop {
            tokio::select! {
                changed = live.changed() => {
                    if changed.is_err() {
                        return close(socket).await;
                    }
                    let now = *live.borrow_and_update();
                    let sent = match now.fault {
                        Some(Fault::WsDrop) => return close(socket).await,
                        Some(Fault::WsGarbage) => socket.send(Message::text(GARBAGE)).await,
                        _ => Ok(()),
                    };
                    let sent = match sent {
                        Ok(()) if now.system != current.system => {
                            socket.send(status(now.system, connection_id)).await
                        }
                        other => other,
                    };
                    if sent.is_err() {
                        return;
                    }
                    current = now;
                }
                message = socket.recv() => {
                    let Some(Ok(message)) = message else { return };
                    let Message::Text(text) = message else { continue };
                    let fault = live.borrow().fault;
                    let sent = match fault {
                        Some(Fault::WsSilent) => Ok(()),
                        Some(Fault::WsGarbage) => socket.send(Message::text(GARBAGE)).await,
                        _ => match ping_id(text.as_str()) {
                            Some(req_id) => socket.send(pong(req_id)).await,
                            None => Ok(()),
                        },
                    };
                    if sent.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

async fn close(mut socket: WebSocket) {
    // The client learns of the close from the frame or from the end of the stream; either will do.
    let _ = socket.send(Message::Close(None)).await;
}

fn status(system: &str, connection_id: u64) -> Message {
    let message = json!({"channel": "status", "type": "update", "data": [{
        "system": system, "api_version": "v2", "connection_id": connection_id, "version": "2.0.10"
    }]});
    Message::text(message.to_string())
}

fn pong(req_id: u64) -> Message {
    Message::text(json!({"method": "pong", "req_id": req_id, "success": true}).to_string())
}

/// The `req_id` of a `{"method":"ping","req_id":N}` request.
fn ping_id(text: &str) -> Option<u64> {
    let value: Value = serde_json::from_str(text).ok()?;
    (value.get("method")?.as_str()? == "ping").then(|| value.get("req_id").and_then(Value::as_u64).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_status_follows_the_scenario() {
        assert_eq!(system(Scenario::Maintenance), "maintenance");
        assert_eq!(system(Scenario::CancelOnly), "cancel_only");
        assert_eq!(system(Scenario::Http429), "online");
    }

    #[test]
    fn pings_are_read_by_their_req_id() {
        assert_eq!(ping_id(r#"{"method":"ping","req_id":101}"#), Some(101));
        assert_eq!(ping_id(r#"{"method":"subscribe"}"#), None);
        assert_eq!(ping_id("garbage"), None);
    }
}
