use super::*;

fn msg(id: &str) -> OutMessage {
    OutMessage {
        routing_key: "t".into(),
        headers: Default::default(),
        body: Bytes::from_static(b"x"),
        message_id: id.into(),
        content_type: None,
        timestamp: None,
    }
}

fn job(n: usize) -> (Job, oneshot::Receiver<Result<Vec<Routing>, BrokerError>>) {
    let (reply, rx) = oneshot::channel();
    let msgs: Vec<Prepared> = (0..n)
        .map(|i| Prepared::new(&msg(&i.to_string())))
        .collect();
    let job = Job {
        exchange: "x".into(),
        outcomes: vec![Outcome::Pending; msgs.len()],
        msgs,
        deadline: Instant::now() + Duration::from_secs(60),
        reply,
        isolate: false,
        last_error: None,
    };
    (job, rx)
}

fn worker() -> (Worker, mpsc::Sender<Job>) {
    let (tx, rx) = mpsc::channel(JOB_QUEUE);
    let link = Arc::new(Link::new(
        "amqp://127.0.0.1:1/%2f".into(),
        Arc::default(),
        "t".into(),
    ));
    let w = Worker {
        id: 0,
        link,
        rx,
        channel: None,
        carry: VecDeque::new(),
    };
    (w, tx)
}

#[tokio::test]
async fn rounds_gather_small_jobs_and_isolate_suspects() {
    let (mut w, tx) = worker();
    let mut receivers = Vec::new();
    for n in [100, 200, 300] {
        let (j, rx) = job(n);
        receivers.push(rx);
        tx.send(j).await.unwrap();
    }
    let first = w.rx.recv().await.unwrap();
    w.carry.push_back(first);
    let round = w.take_round();
    assert_eq!(
        round.iter().map(|j| j.msgs.len()).collect::<Vec<_>>(),
        [100, 200]
    );
    // The job that did not fit waits for the next round.
    assert_eq!(w.carry.len(), 1);

    // A channel error in a shared round: both jobs are retried, each alone.
    w.settle(
        round,
        RoundEnd::Broken(BrokerError::Protocol {
            code: 404,
            text: "NOT_FOUND".into(),
        }),
    );
    assert_eq!(w.carry.len(), 3);
    let alone = w.take_round();
    assert_eq!(alone.len(), 1);
    assert!(alone[0].isolate);
    // Alone, the same error is the job's own answer.
    w.settle(
        alone,
        RoundEnd::Broken(BrokerError::Protocol {
            code: 404,
            text: "NOT_FOUND".into(),
        }),
    );
    let answer = receivers.remove(0).await.unwrap();
    assert!(matches!(
        answer,
        Err(BrokerError::Protocol { code: 404, .. })
    ));
}

#[tokio::test]
async fn broken_rounds_keep_jobs_and_expire_them_at_the_deadline() {
    let (mut w, _tx) = worker();
    let (mut j, rx) = job(3);
    j.outcomes[0] = Outcome::Routed;
    w.carry.push_back(j);
    let round = w.take_round();
    w.settle(
        round,
        RoundEnd::Broken(BrokerError::Unavailable("gone".into())),
    );
    assert_eq!(w.carry.len(), 1);
    assert_eq!(
        w.carry[0].unsent(),
        2,
        "only unconfirmed messages are sent again"
    );
    w.carry[0].deadline = Instant::now();
    w.expire();
    assert!(w.carry.is_empty());
    let err = rx.await.unwrap().unwrap_err();
    assert!(err.is_transient());
    assert!(err.to_string().contains("gone"), "{err}");
}

#[tokio::test]
async fn nacks_and_returns_are_answered() {
    let (mut w, _tx) = worker();
    let (mut a, rx_a) = job(2);
    a.outcomes = vec![Outcome::Routed, Outcome::Unroutable];
    let (mut b, rx_b) = job(2);
    b.outcomes = vec![Outcome::Routed, Outcome::Nacked];
    w.settle(vec![a, b], RoundEnd::Complete);
    assert_eq!(
        rx_a.await.unwrap().unwrap(),
        vec![Routing::Routed, Routing::Unroutable]
    );
    assert_eq!(
        rx_b.await.unwrap().unwrap_err(),
        BrokerError::Nacked { count: 1 }
    );
}
