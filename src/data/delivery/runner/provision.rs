//! The subscription's queues: declaring them and their bindings, the delay queues of retries,
//! and finding the queues of an earlier shape that must be drained.

use super::*;

impl Inner {
    /// Declares the queues and bindings; true if the subscription's queue did not exist.
    pub(super) async fn provision(&self) -> Result<bool, DeliveryError> {
        let broker = &self.stream.broker;
        let first = self.names.consumed()[0].clone();
        let fresh = broker.queue_counts(&first).await?.is_none();
        self.declare_or_keep(&self.names.dead_letter_queue, FieldTable::default())
            .await?;
        match &self.names.hash_exchange {
            None => {
                self.declare_or_keep(&self.names.queue, FieldTable::default())
                    .await?;
            }
            Some(hx) => {
                let OrderingPlan::PerKey { partition_key, .. } = &self.plan.ordering else {
                    return Err(DeliveryError::Other("hash exchange without perKey".into()));
                };
                let ch = broker.open_channel().await?;
                let mut args = FieldTable::default();
                args.insert(
                    "hash-header".into(),
                    AMQPValue::LongString(format!("cloudEvents:{partition_key}").into()),
                );
                let durable = ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                };
                let r = ch
                    .exchange_declare(
                        hx.as_str().into(),
                        ExchangeKind::Custom("x-consistent-hash".into()),
                        durable,
                        args,
                    )
                    .await;
                let _ = ch.close(200, "OK".into()).await;
                r.map_err(|e| {
                    DeliveryError::Other(format!(
                        "declaring the consistent-hash exchange {hx} (is the \
                         rabbitmq_consistent_hash_exchange plugin enabled?): {e}"
                    ))
                })?;
                for q in &self.names.partitions {
                    let mut a = FieldTable::default();
                    a.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
                    self.declare_or_keep(q, a).await?;
                    // With the consistent-hash exchange the binding key is the weight.
                    broker.bind_queue(q, hx, "1").await?;
                }
                for h in &self.names.holds {
                    self.declare_or_keep(h, FieldTable::default()).await?;
                }
            }
        }
        for exchange in self.exchanges() {
            self.bind_exchange(&exchange).await?;
        }
        self.state.provisioned.store(true, Ordering::Release);
        Ok(fresh)
    }

    /// Binds the subscription's queue (or, under perKey, its consistent-hash exchange) to a
    /// stream's exchange, with the topic patterns its filters allow.
    pub(super) async fn bind_exchange(&self, exchange: &str) -> Result<(), DeliveryError> {
        let broker = &self.stream.broker;
        broker.declare_exchange(exchange).await?;
        let keys = binding_keys(&self.plan);
        let Some(hx) = &self.names.hash_exchange else {
            for k in &keys {
                broker.bind_queue(&self.names.queue, exchange, k).await?;
            }
            return Ok(());
        };
        let ch = broker.open_channel().await?;
        let r = async {
            for k in &keys {
                ch.exchange_bind(
                    hx.as_str().into(),
                    exchange.into(),
                    k.as_str().into(),
                    ExchangeBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            }
            lapin::Result::Ok(())
        }
        .await;
        let _ = ch.close(200, "OK".into()).await;
        r.map_err(|e| DeliveryError::Other(format!("binding {hx} to {exchange}: {e}")))
    }

    /// Undoes [`Inner::bind_exchange`].
    pub(super) async fn unbind_exchange(&self, exchange: &str) -> Result<(), DeliveryError> {
        let broker = &self.stream.broker;
        let keys = binding_keys(&self.plan);
        let Some(hx) = &self.names.hash_exchange else {
            for k in &keys {
                broker.unbind_queue(&self.names.queue, exchange, k).await?;
            }
            return Ok(());
        };
        let ch = broker.open_channel().await?;
        let r = async {
            for k in &keys {
                ch.exchange_unbind(
                    hx.as_str().into(),
                    exchange.into(),
                    k.as_str().into(),
                    ExchangeUnbindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            }
            lapin::Result::Ok(())
        }
        .await;
        let _ = ch.close(200, "OK".into()).await;
        r.map_err(|e| DeliveryError::Other(format!("unbinding {hx} from {exchange}: {e}")))
    }

    pub(super) async fn declare_delay_queue(
        &self,
        queue: &str,
        delay: Duration,
    ) -> Result<(), DeliveryError> {
        let qt = self.stream.plan.broker.queue_type;
        let mut args = FieldTable::default();
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(delay.as_millis() as i64),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from("")),
        );
        // Back to the subscription's queue (perKey retries wait in place, so this is only
        // used with ordering none).
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(self.names.queue.as_str().into()),
        );
        if qt == QueueType::Quorum {
            // Expired messages move at least once: the broker republishes with a confirm
            // before it drops the message here.
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString("at-least-once".into()),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
        }
        self.declare_or_keep(queue, args).await
    }

    /// Declares a queue. One that exists with other immutable arguments (the stream's
    /// `queueType` changed, say) is kept as it is and reported, instead of failing for ever:
    /// its messages stay deliverable. Deleting the subscription with `--prune` recreates it.
    pub(super) async fn declare_or_keep(
        &self,
        name: &str,
        args: FieldTable,
    ) -> Result<(), DeliveryError> {
        let qt = self.stream.plan.broker.queue_type;
        match self.stream.broker.declare_queue(name, qt, args).await {
            Err(BrokerError::Protocol { code: 406, text }) => {
                if self.stream.broker.queue_counts(name).await?.is_none() {
                    return Err(BrokerError::Protocol { code: 406, text }.into());
                }
                let notice = format!(
                    "queue {name} exists with other arguments ({text}); it is kept as it is \
                     (delete the subscription with --prune to recreate it)"
                );
                tracing::warn!(subscription = %self.plan.key, "{notice}");
                *self.state.notice.locked() = Some(notice);
                Ok(())
            }
            r => Ok(r?),
        }
    }

    /// Queues of an earlier shape of this subscription (another `ordering`, fewer
    /// `partitions`) that still exist: unbound here so that nothing new reaches them, then
    /// drained by [`drain`].
    pub(super) async fn retire_stale(&self) -> Result<Vec<String>, DeliveryError> {
        let broker = &self.stream.broker;
        let (mut stale, first_lane) = match &self.plan.ordering {
            OrderingPlan::None => (vec![], 0),
            OrderingPlan::PerKey { partitions, .. } => {
                let main = &self.names.queue;
                let found = broker.queue_counts(main).await?.is_some();
                (if found { vec![main.clone()] } else { vec![] }, *partitions)
            }
        };
        // Lanes are always declared p0, p1, … in order, so the first one missing ends the
        // stale ones: looking further would only log the broker's NOT_FOUND for each.
        for i in first_lane..MAX_PARTITIONS_SCAN {
            let q = format!("{}.p{i}", self.names.queue);
            if broker.queue_counts(&q).await?.is_none() {
                break;
            }
            stale.push(q);
        }
        if stale.is_empty() {
            return Ok(stale);
        }
        match &self.names.hash_exchange {
            // Deleting the old hash exchange removes its bindings, both ways.
            None => {
                broker
                    .delete_exchange(&format!(
                        "weir-hash.{}.{}",
                        self.plan.key.namespace, self.plan.key.name
                    ))
                    .await?
            }
            Some(hx) => {
                for q in stale.iter().filter(|q| **q != self.names.queue) {
                    broker.unbind_queue(q, hx, "1").await?;
                }
            }
        }
        if stale.contains(&self.names.queue) {
            let mut keys = binding_keys(&self.plan);
            keys.push("#".into());
            keys.dedup();
            for exchange in self.exchanges() {
                for k in &keys {
                    broker.unbind_queue(&self.names.queue, &exchange, k).await?;
                }
            }
        }
        tracing::info!(subscription = %self.plan.key, queues = ?stale, "draining queues of an earlier shape");
        Ok(stale)
    }
}
