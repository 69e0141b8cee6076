//! The broker edge: everything that speaks AMQP to RabbitMQ — the connection
//! and confirmed publishing ([`amqp`]), header names ([`headers`]), queues and
//! exchanges as data ([`topology`]), delay tiers ([`retry`]) and the operator
//! tools of the parking queue ([`dlq`]).

pub mod amqp;
pub mod dlq;
pub mod headers;
pub mod retry;
pub mod topology;
