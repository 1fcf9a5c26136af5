//! The AMQP 0-9-1 bus (feature `amqp`; `burst.nexus.workflow.bus = amqp://...`), through
//! `lapin`: several nodes share the work of one rules file through RabbitMQ.
//!
//! - A sensor's event goes, once per rule its filter matches, to the durable queue of that
//!   rule, `nexus.rule.RULE` (a quorum queue), with publisher confirms: the sensor's cursor
//!   moves only once the broker holds every copy.
//! - Each node consumes the queue of each rule it has, `concurrency` deliveries at a time
//!   (the prefetch), and acks a delivery when its run has ended: a success acks; a run that
//!   failed for good is rejected to the dead-letter queue `nexus.dead.RULE` (through the
//!   exchange `nexus.dead`). A node that dies leaves its deliveries unacked, and the broker
//!   gives them to another node: at least once.
//! - One thread, `nexus-bus`, holds the connection on a current-thread runtime. A lost
//!   connection is opened again after a backoff (500 ms doubling to 30 s); while it is down
//!   a publish fails at once (the sensor retries, the HTTP sensor answers 503), and the
//!   gauge `nexus_workflow_bus_connected` and `/readyz` say so.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::mpsc;

use crate::event::Event;
use crate::store::Delivery;

/// The exchange dead letters go through.
const DEAD_EXCHANGE: &str = "nexus.dead";

/// The longest a publish waits for the broker's confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// The queue of `rule`.
pub fn queue_of(rule: &str) -> String {
    format!("nexus.rule.{rule}")
}

/// The dead-letter queue of `rule`.
pub fn dead_queue_of(rule: &str) -> String {
    format!("nexus.dead.{rule}")
}

/// How a delivery ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Done: the broker drops it.
    Ack,
    /// Failed for good: to the dead-letter queue.
    Dead,
    /// Not taken here (the state could not be written): back to the queue.
    Requeue,
}

enum Command {
    Publish {
        rule: String,
        id: String,
        body: Vec<u8>,
        done: std::sync::mpsc::SyncSender<Result<(), String>>,
    },
    Settle(Delivery, Settle),
}

/// A delivered event: the rule it is for, the event, and the delivery to settle.
pub type Delivered = (String, Event, Delivery, bool);

/// The bus as the engine sees it.
pub struct Bus {
    commands: mpsc::UnboundedSender<Command>,
    connected: Arc<AtomicBool>,
    stopping: Arc<AtomicBool>,
}

impl Bus {
    /// Starts the bus thread for `url`, consuming the queues of `rules` (name and prefetch)
    /// into `deliveries`.
    pub fn start(
        url: String,
        rules: Vec<(String, u16)>,
        deliveries: crossbeam_channel::Sender<Delivered>,
    ) -> std::io::Result<(Bus, std::thread::JoinHandle<()>)> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let connected = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&connected);
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&stopping);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let link = Link {
            url,
            rules,
            deliveries,
            connected: flag,
            stop,
        };
        let thread = std::thread::Builder::new()
            .name("nexus-bus".into())
            .spawn(move || {
                runtime.block_on(run(&link, &mut rx));
            })?;
        Ok((
            Bus {
                commands: tx,
                connected,
                stopping,
            },
            thread,
        ))
    }

    /// Closes the connection and ends the thread (within 100 ms). Deliveries not settled go
    /// back to the broker with the connection.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Whether the connection to the broker is up.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Publishes `event` to the queue of `rule` and waits for the broker's confirm.
    pub fn publish(&self, rule: &str, event: &Event) -> Result<(), String> {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        let body = event.to_json().to_string().into_bytes();
        self.commands
            .send(Command::Publish {
                rule: rule.to_string(),
                id: event.id.clone(),
                body,
                done,
            })
            .map_err(|_| "the bus has stopped".to_string())?;
        wait.recv_timeout(CONFIRM_TIMEOUT + Duration::from_secs(1))
            .map_err(|_| "the broker did not confirm in time".to_string())?
    }

    /// Settles a delivery.
    pub fn settle(&self, delivery: Delivery, how: Settle) {
        let _ = self.commands.send(Command::Settle(delivery, how));
    }
}

fn set_connected(flag: &AtomicBool, up: bool) {
    flag.store(up, Ordering::Release);
    metrics::gauge!(crate::telemetry::names::BUS_CONNECTED).set(if up { 1.0 } else { 0.0 });
}

/// What the bus thread works with.
struct Link {
    url: String,
    /// The rules consumed, with their prefetch.
    rules: Vec<(String, u16)>,
    deliveries: crossbeam_channel::Sender<Delivered>,
    connected: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

async fn run(link: &Link, commands: &mut mpsc::UnboundedReceiver<Command>) {
    let (connected, stop) = (&*link.connected, &*link.stop);
    let mut generation = 0u64;
    let mut backoff = Duration::from_millis(500);
    set_connected(connected, false);
    loop {
        generation += 1;
        let started = tokio::time::Instant::now();
        match session(link, commands, generation).await {
            Ok(()) => return,
            Err(e) => {
                set_connected(connected, false);
                metrics::counter!(crate::telemetry::names::BUS_RECONNECTS).increment(1);
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_millis(500);
                }
                tracing::warn!(error = %e, wait_ms = backoff.as_millis() as u64,
                               "The workflow bus lost the broker; connecting again.");
            }
        }
        // While down: publishes fail at once; settles of the lost connection are dropped.
        let until = tokio::time::Instant::now() + backoff;
        loop {
            if stop.load(Ordering::Acquire) {
                return;
            }
            let tick = tokio::time::sleep_until(
                until.min(tokio::time::Instant::now() + Duration::from_millis(100)),
            );
            tokio::select! {
                _ = tick => {
                    if tokio::time::Instant::now() >= until {
                        break;
                    }
                }
                command = commands.recv() => match command {
                    None => return,
                    Some(Command::Publish { done, .. }) => {
                        let _ = done.send(Err("the workflow bus is not connected to the broker".into()));
                    }
                    Some(Command::Settle(..)) => {}
                },
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

fn quorum_queue_arguments(rule: &str) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(DEAD_EXCHANGE.into()),
    );
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(rule.into()),
    );
    arguments
}

/// Declares the exchange and the queues (idempotent: every node does it at every connect).
async fn declare(channel: &Channel, rules: &[(String, u16)]) -> lapin::Result<()> {
    let durable = || QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .exchange_declare(
            DEAD_EXCHANGE.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    for (rule, _) in rules {
        channel
            .queue_declare(
                dead_queue_of(rule).as_str().into(),
                durable(),
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                dead_queue_of(rule).as_str().into(),
                DEAD_EXCHANGE.into(),
                rule.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(
                queue_of(rule).as_str().into(),
                durable(),
                quorum_queue_arguments(rule),
            )
            .await?;
    }
    Ok(())
}

/// One connection, until it fails (`Err`) or the workflow stops (`Ok`).
async fn session(
    link: &Link,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    generation: u64,
) -> Result<(), String> {
    let (url, rules, deliveries) = (link.url.as_str(), &link.rules[..], &link.deliveries);
    let (connected, stop) = (&*link.connected, &*link.stop);
    fn fail(what: &'static str) -> impl Fn(lapin::Error) -> String {
        move |e| format!("{what}: {e}")
    }
    let connection = Connection::connect(
        url,
        ConnectionProperties::default().with_connection_name("nexus-workflow".into()),
    )
    .await
    .map_err(fail("connect"))?;
    let publisher = connection.create_channel().await.map_err(fail("channel"))?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(fail("confirm.select"))?;
    declare(&publisher, rules).await.map_err(fail("declare"))?;
    // A consumer per rule, each on its own channel (its prefetch is the rule's concurrency).
    let (lost_tx, mut lost) = mpsc::unbounded_channel::<String>();
    let mut channels = std::collections::HashMap::new();
    for (rule, prefetch) in rules {
        let channel = connection.create_channel().await.map_err(fail("channel"))?;
        channel
            .basic_qos(*prefetch, BasicQosOptions::default())
            .await
            .map_err(fail("basic.qos"))?;
        let mut consumer = channel
            .basic_consume(
                queue_of(rule).as_str().into(),
                format!("nexus-{rule}-{}", std::process::id())
                    .as_str()
                    .into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(fail("basic.consume"))?;
        channels.insert(rule.clone(), channel.clone());
        let rule = rule.clone();
        let deliveries = deliveries.clone();
        let lost_tx = lost_tx.clone();
        let nack_channel = channel.clone();
        tokio::spawn(async move {
            while let Some(delivery) = crate::next_item(&mut consumer).await {
                let delivery = match delivery {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = lost_tx.send(format!("consumer of {rule}: {e}"));
                        return;
                    }
                };
                let tag = delivery.delivery_tag;
                let event = serde_json::from_slice::<serde_json::Value>(&delivery.data)
                    .ok()
                    .and_then(|v| Event::from_json(&v));
                let Some(event) = event else {
                    tracing::error!(rule = %rule, "A message on the bus is not an event; dead-lettered.");
                    let _ = nack_channel
                        .basic_nack(
                            tag,
                            BasicNackOptions {
                                requeue: false,
                                multiple: false,
                            },
                        )
                        .await;
                    continue;
                };
                if delivery.redelivered {
                    metrics::counter!(crate::telemetry::names::BUS_REDELIVERED, "rule" => rule.clone())
                        .increment(1);
                }
                let settle = Delivery {
                    rule: rule.clone(),
                    generation,
                    tag,
                };
                if deliveries
                    .send((rule.clone(), event, settle, delivery.redelivered))
                    .is_err()
                {
                    return;
                }
            }
            let _ = lost_tx.send(format!("the consumer of {rule} ended"));
        });
    }
    set_connected(connected, true);
    tracing::info!(
        rules = rules.len(),
        "The workflow bus is connected to the broker."
    );
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if stop.load(Ordering::Acquire) {
                    let _ = connection.close(200, "stopping".into()).await;
                    return Ok(());
                }
                if !connection.status().connected() {
                    return Err("the connection closed".into());
                }
            }
            why = lost.recv() => {
                return Err(why.unwrap_or_else(|| "the consumers ended".into()));
            }
            command = commands.recv() => match command {
                None => return Ok(()),
                Some(Command::Publish { rule, id, body, done }) => {
                    let result = publish(&publisher, &rule, &id, &body).await;
                    let failed = result.is_err();
                    let _ = done.send(result.clone());
                    if failed && !connection.status().connected() {
                        return Err(result.err().unwrap_or_default());
                    }
                }
                Some(Command::Settle(delivery, how)) => {
                    if delivery.generation != generation {
                        continue;
                    }
                    let Some(channel) = channels.get(&delivery.rule) else { continue };
                    let settled = match how {
                        Settle::Ack => channel.basic_ack(delivery.tag, BasicAckOptions::default()).await,
                        Settle::Dead | Settle::Requeue => {
                            if how == Settle::Dead {
                                metrics::counter!(crate::telemetry::names::BUS_DEAD_LETTERED,
                                                  "rule" => delivery.rule.clone()).increment(1);
                            }
                            channel
                                .basic_nack(delivery.tag, BasicNackOptions {
                                    requeue: how == Settle::Requeue,
                                    multiple: false,
                                })
                                .await
                        }
                    };
                    if let Err(e) = settled {
                        return Err(format!("settle: {e}"));
                    }
                }
            },
        }
    }
}

async fn publish(channel: &Channel, rule: &str, id: &str, body: &[u8]) -> Result<(), String> {
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(id.into())
        .with_content_type("application/json".into());
    let confirm = channel
        .basic_publish(
            "".into(),
            queue_of(rule).as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            properties,
        )
        .await
        .map_err(|e| format!("publish: {e}"))?;
    let confirmed = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
        .await
        .map_err(|_| "the broker did not confirm in time".to_string())?
        .map_err(|e| format!("publish: {e}"))?;
    match confirmed {
        Confirmation::Ack(None) => {
            metrics::counter!(crate::telemetry::names::BUS_PUBLISHED, "rule" => rule.to_string())
                .increment(1);
            Ok(())
        }
        Confirmation::Ack(Some(_)) => Err(format!("the broker has no queue {}", queue_of(rule))),
        Confirmation::Nack(_) => Err("the broker refused the event".into()),
        Confirmation::NotRequested => Err("the broker was not asked to confirm".into()),
    }
}
